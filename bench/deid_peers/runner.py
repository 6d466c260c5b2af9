#!/usr/bin/env python
"""De-identify every file of a folder with a library that has no command of its own here.

Usage::

    python bench/deid_peers/runner.py ENGINE INDIR OUTDIR     # ENGINE: dcmanon | pacsbridge
    python bench/deid_peers/runner.py ENGINE --check          # exit 0, or 3 with the reason

``bench/deidentify.py`` runs it with the interpreter of the engine's venv (``dcmanon``: the venv
made from ``requirements-dcmanon.txt``; ``pacsbridge``: the project's ``.venv``), one process per
shard of the input: the harness, not this script, makes the one-process-per-core mode, the same way
for every tool (the command-line tools it runs cannot be told to use several processes).

Each file of INDIR (sorted by name; symbolic links followed) is de-identified with the engine's
closest default profile and written to OUTDIR under its own name:

- ``dcmanon``: ``dcmanon.Anonymizer()`` (its default tag actions and UID root), ``.anonymize(path)``
  returns the file's bytes. dcmanon's command-line tool is published on crates.io only.
- ``pacsbridge``: ``Profile(ProjectConfig(), KeyedIdentity(ProjectKey(secret, "bench")))`` from
  :mod:`pacsbridge.shared.deid.profile` (PS3.15 Annex E, default options), ``.apply(path)``
  returns a ``Deidentified`` whose ``data`` is the file's bytes, or ``None`` when the project's risk
  policy withholds it (counted, not written). The secret is a fixed benchmark value.

stdout: one JSON line, ``{"engine", "files", "written", "withheld", "seconds"}`` (``seconds``: the
processing loop only, imports and set-up excluded; the harness times the whole command).
Exit status: 0 done, 1 a file failed, 3 the engine is not there (the reason on stderr).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

#: Exit status when the engine cannot be imported: the harness reports the tool as unavailable.
MISSING = 3

#: A fixed secret: the benchmark measures speed; it de-identifies synthetic data only.
BENCH_SECRET = b"pacsbridge-benchmark-secret-synthetic-data-only"

Engine = Callable[[str], "bytes | None"]


def _dcmanon() -> Engine:
    from dcmanon import Anonymizer  # type: ignore[import-not-found]

    anonymizer = Anonymizer()
    return anonymizer.anonymize  # type: ignore[no-any-return]


def _pacsbridge() -> Engine:
    from pacsbridge.shared.deid.keys import KeyedIdentity, ProjectKey
    from pacsbridge.shared.deid.options import ProjectConfig
    from pacsbridge.shared.deid.profile import Profile  # type: ignore[import-not-found, unused-ignore]

    profile = Profile(ProjectConfig(), KeyedIdentity(ProjectKey(BENCH_SECRET, "bench")))

    def apply(path: str) -> bytes | None:
        return profile.apply(path).data  # type: ignore[no-any-return, unused-ignore]

    return apply


ENGINES: dict[str, Callable[[], Engine]] = {"dcmanon": _dcmanon, "pacsbridge": _pacsbridge}


def load(name: str) -> Engine:
    """The engine's per-file function; :class:`SystemExit` (status :data:`MISSING`) when it is not there."""
    try:
        return ENGINES[name]()
    except ImportError as exc:
        where = ("pacsbridge.shared.deid.profile (the engine of issue 16) is not in this checkout yet"
                 if name == "pacsbridge" else f"{name} is not installed in {sys.prefix}")
        print(f"{name}: {where}: {exc}", file=sys.stderr)
        raise SystemExit(MISSING) from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[1] == "--check" and args[0] in ENGINES:
        load(args[0])
        return 0
    if len(args) != 3 or args[0] not in ENGINES:
        print(__doc__, file=sys.stderr)
        return 2
    engine = load(args[0])
    indir, outdir = Path(args[1]), Path(args[2])
    outdir.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(indir))
    written = withheld = 0
    t0 = time.perf_counter()
    for name in names:
        data = engine(str(indir / name))
        if data is None:
            withheld += 1
            continue
        with open(outdir / name, "wb") as fh:
            fh.write(data)
        written += 1
    seconds = time.perf_counter() - t0
    print(json.dumps({"engine": args[0], "files": len(names), "written": written, "withheld": withheld,
                      "seconds": round(seconds, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
