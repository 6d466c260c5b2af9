"""De-identification alone, one process: files/s of ``Profile.apply`` on files read from disk and
written to disk (the closing benchmark of issue 16 runs the other tools beside it).

    python bench/gen_ct.py /tmp/ct --instances 2000
    python bench/deid.py /tmp/ct /tmp/ct-deid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import log  # noqa: E402

from pacsbridge.shared.deid.keys import KeyedIdentity, ProjectKey  # noqa: E402
from pacsbridge.shared.deid.options import ProjectConfig  # noqa: E402
from pacsbridge.shared.deid.profile import Profile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder of .dcm files (bench/gen_ct.py)")
    parser.add_argument("target", type=Path, help="folder for the de-identified files")
    args = parser.parse_args(argv)
    files = sorted(args.source.rglob("*.dcm"))
    if not files:
        raise SystemExit(f"no .dcm file under {args.source}")
    args.target.mkdir(parents=True, exist_ok=True)
    profile = Profile(ProjectConfig(), KeyedIdentity(ProjectKey(b"bench-secret-0123456789abcdef012", "bench")))
    log(f"{len(files)} files")
    wall, cpu = time.perf_counter(), time.process_time()
    for i, path in enumerate(files):
        result = profile.apply(path)
        if result.data is not None:
            (args.target / f"{i:06d}.dcm").write_bytes(result.data)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"files": len(files), "seconds": round(wall, 2), "files_per_s": round(len(files) / wall, 1),
                      "files_per_cpu_s": round(len(files) / cpu, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
