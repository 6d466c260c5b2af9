#!/usr/bin/env python
"""De-identification alone, files/s: pacsbridge's engine against dicognito, pydicom/deid and dcmanon.

Usage::

    python bench/deidentify.py [--instances 2000] [--runs 3] [--processes 1,2]
        [--tools dicognito,deid,dcmanon,pacsbridge,pacsbridge-engine] [--workdir /tmp/pacsbridge-bench-deid]
        [--quiet-wait 60] [--keep-output]

Steps:

1. ``bench/gen_ct.py`` writes N synthetic 512x512 CT (explicit VR little endian, ~0.5 MB each, 10
   patients) into ``WORKDIR/gen`` (cached while a stamp says the count matches). Every file is read
   once (warm page cache, the same for every tool) and its PatientID, PatientName and UIDs are kept
   for the checks. ``WORKDIR/shards/p<K>/s<i>`` hold symbolic links to K disjoint shares of the
   files (round robin) for K = 1 and K = the number of cores, and ``WORKDIR/shards/one`` one file.
2. Each peer runs in its own venv, ``.bench-venvs/<tool>`` (at the repository's root, gitignored),
   made before any clock starts from ``bench/deid_peers/requirements-<tool>.txt`` with exact pins
   from PyPI, and remade when that list changes. pacsbridge runs twice: ``pacsbridge`` with this
   interpreter (the project's ``.venv``, which also holds numpy, Pillow and requests, each imported
   by pydicom at start when installed), and ``pacsbridge-engine`` in ``.bench-venvs/pacsbridge-engine``,
   which holds only what the engine imports (pydicom and pydantic, at this environment's versions) and
   this checkout on its path: the engine measured in a venv of its own, as each peer is. A tool that
   cannot be had, or whose import fails, is left out with the reason in the report and in the JSON.
3. The commands, each with its closest default profile:

   - ``dicognito``: its CLI, ``python -m dicognito --seed pacsbridge-bench --output-directory OUT
     SHARD`` (its default anonymizer; one fixed seed so that the shards of a study agree, as one
     process would; the installed ``dicognito`` script of 0.19.0 fails, the module runs the same main).
   - ``deid``: its CLI with the default recipe, ``deid --outfolder OUT identifiers --action all
     --input SHARD`` (get the identifiers, then replace them and save, as ``deid`` documents).
   - ``dcmanon``: ``bench/deid_peers/runner.py dcmanon SHARD OUT``: ``dcmanon.Anonymizer()`` (its
     default tag actions) over the files; PyPI has the Rust engine's Python binding only.
   - ``pacsbridge``: ``bench/deid_peers/runner.py pacsbridge SHARD OUT``: ``Profile(ProjectConfig(),
     KeyedIdentity(ProjectKey(secret, "bench"))).apply(path).data`` (PS3.15 Annex E, default options);
     ``pacsbridge-engine``: the same command in the engine's venv.

   One process: the command on the whole set. One per core: the command K times at once, one per
   shard, for every tool alike (neither CLI can use several processes itself).
4. Timing: the wall clock of the whole commands, from the first start to the last exit (interpreter
   start, imports, reading, de-identifying and writing every file included), files/s = N / that.
   ``startup_s`` is the same command on one file (1 process): the fixed cost inside that figure.
   The runner's own processing-loop time is in the JSON (``inner_s``) for dcmanon and pacsbridge.
   ``cpu_ms`` is the CPU time (user + system) of the tool's processes per file, from their rusage:
   on a shared machine it is the steadier figure, since others' work slows the wall clock but not it;
   ``others`` is the share of the machine's CPU that other processes used during the command
   (``/proc/stat`` less the tool's own), so a run slowed by a neighbour can be seen as such.
5. Runs are interleaved: each run goes through every process count, and within it every tool, in an
   order rotated from run to run, so drift on the machine is shared. Before each command the disks
   are synced and the script waits (up to ``--quiet-wait`` s) for idle CPUs. Each command writes
   into a fresh output folder; afterwards the output count is checked (N, less what pacsbridge's
   risk policy withholds) and one output file must carry none of the original PatientIDs, names and
   UIDs. Outputs are then truncated, not deleted (see :func:`benchlib.create_probe`: deleting
   charges the next creator on this machine's ext4), and everything is removed at the end unless
   ``--keep-output``.

stdout: a table of medians (files/s, and CPU ms per file) per tool and process count, every run,
the ratios pacsbridge / dicognito (target >= 5) and pacsbridge / dcmanon (stretch >= 0.5), by
files/s and by CPU per file, for each of the two pacsbridge venvs (``pb``, ``pbe``), then one JSON line.
Exit status 0 when every check passed (whether or not a target was met), 1 otherwise.

The second piece of issue 16's benchmark, a push with de-identification against a plain push into
DCMTK storescp, is ``bench/push.py --project``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from benchlib import (  # noqa: E402
    count_files, create_probe, host_facts, log, machine_cpu_s, read_stamp, truncate_files, wait_quiet,
    warm_cache, write_stamp,
)

DEFAULT_WORKDIR = Path("/tmp/pacsbridge-bench-deid")
#: Outside bench/: tests walk bench/ for Python sources, and a venv holds thousands of them.
VENVS = BENCH_DIR.parent / ".bench-venvs"
PEERS = BENCH_DIR / "deid_peers"
RUNNER = PEERS / "runner.py"
TOOLS = ("dicognito", "deid", "dcmanon", "pacsbridge", "pacsbridge-engine")
#: What pacsbridge's de-identification engine imports from outside the standard library
#: (``shared/deid`` -> pydicom, and pydantic for the project's options): the engine's own venv holds
#: these, at the versions of this interpreter's environment, and the checkout on its path.
ENGINE_DISTS = ("pydicom", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                "typing-extensions")
#: Ours, measured two ways: in the project's venv, and in a venv of the engine's dependencies only.
OURS = ("pacsbridge", "pacsbridge-engine")
#: pacsbridge / dicognito at least this (issue 16), and pacsbridge / dcmanon as a stretch.
GOALS = {"dicognito": 5.0, "dcmanon": 0.5}
MISSING = 3  # runner.py's exit status for an engine that is not there


@dataclass
class Tool:
    """A tool under test: how to run it on a shard, and with which interpreter."""

    name: str
    python: Path
    command: Callable[[Path, Path, Path], list[str]]  # (python, shard, out) -> argv
    version: str = ""
    unavailable: str = ""  # the reason it is left out, or ""


def _dicognito(py: Path, shard: Path, out: Path) -> list[str]:
    return [str(py), "-m", "dicognito", "--seed", "pacsbridge-bench", "--output-directory", str(out), str(shard)]


def _deid(py: Path, shard: Path, out: Path) -> list[str]:
    return [str(py.parent / "deid"), "--outfolder", str(out), "identifiers", "--action", "all", "--input", str(shard)]


def _runner(engine: str) -> Callable[[Path, Path, Path], list[str]]:
    def command(py: Path, shard: Path, out: Path) -> list[str]:
        return [str(py), str(RUNNER), engine, str(shard), str(out)]

    return command


COMMANDS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    "dicognito": _dicognito, "deid": _deid, "dcmanon": _runner("dcmanon"), "pacsbridge": _runner("pacsbridge"),
    "pacsbridge-engine": _runner("pacsbridge")}


def tool_env() -> dict[str, str]:
    """This environment without pacsbridge's settings and venv markers (each tool has its own interpreter)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PACSBRIDGE_") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


# -- venvs -------------------------------------------------------------------------------
def _make_venv(name: str, key: object, install: list[str], source: str,
               then: Callable[[Path], None] | None = None) -> tuple[Path, str]:
    """``.bench-venvs/<name>`` with ``pip install *install`` (then ``then(python)``), reused while its
    stamp holds ``key``. Returns the venv's interpreter and "" on success, or a path and the reason."""
    venv = VENVS / name
    py = venv / "bin" / "python"
    stamp = venv / "pacsbridge-bench.json"
    if read_stamp(stamp).get("requirements") == key and py.exists():
        return py, ""
    shutil.rmtree(venv, ignore_errors=True)
    log(f"making {venv} from {source} ...")
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *install]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, env=tool_env(), check=False)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return py, f"{' '.join(step[:5])} failed (exit {proc.returncode}): {tail}"
    if then is not None:
        then(py)
    write_stamp(stamp, {"requirements": key})
    return py, ""


def ensure_venv(name: str) -> tuple[Path, str]:
    """``.bench-venvs/<name>`` made from its pinned list (reused while the list is unchanged).

    Returns the venv's interpreter and "" on success, or a path and the reason it cannot be had.
    """
    reqs = PEERS / f"requirements-{name}.txt"
    return _make_venv(name, hashlib.sha256(reqs.read_bytes()).hexdigest(), ["-r", str(reqs)], reqs.name)


def ensure_engine_venv() -> tuple[Path, str]:
    """``.bench-venvs/pacsbridge-engine``: :data:`ENGINE_DISTS` at this environment's versions, and a
    ``.pth`` naming this checkout (its code, not a copy; no editable-install finder to load at start).

    Each peer runs in a venv holding its own dependencies only; pacsbridge's project venv also holds
    numpy, Pillow and requests (push's RLE, dicomweb-client), which pydicom imports at start whenever
    they are installed (0.24 s of CPU against 0.07 s without them). This venv measures the engine the
    way the peers are measured. Remade when the versions change.
    """
    from importlib.metadata import version

    def add_checkout(py: Path) -> None:
        proc = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, env=tool_env(), check=True)
        (Path(proc.stdout.strip()) / "pacsbridge-checkout.pth").write_text(f"{BENCH_DIR.parent}\n")

    pins = sorted(f"{d}=={version(d)}" for d in ENGINE_DISTS)
    return _make_venv("pacsbridge-engine", pins, pins, ", ".join(pins), then=add_checkout)


def pip_version(py: Path, package: str) -> str:
    """The installed version of ``package`` in the interpreter ``py``'s environment."""
    proc = subprocess.run([str(py), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
                          capture_output=True, text=True, env=tool_env(), check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def prepare_tools(names: list[str]) -> list[Tool]:
    """Every tool ready to run (venv made, import checked) or marked unavailable with the reason."""
    tools = []
    for name in names:
        if name == "pacsbridge":
            py, reason = Path(sys.executable), ""
        elif name == "pacsbridge-engine":
            py, reason = ensure_engine_venv()
        else:
            py, reason = ensure_venv(name)
        tool = Tool(name, py, COMMANDS[name], unavailable=reason)
        if not reason:
            check = ([str(py), str(RUNNER), name.split("-")[0], "--check"] if name in ("dcmanon", *OURS)
                     else [str(py), "-c", f"import {name}"])
            proc = subprocess.run(check, capture_output=True, text=True, env=tool_env(), check=False)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                tool.unavailable = tail[0]
            tool.version = pip_version(py, name.split("-")[0] if name in OURS else name)
        if tool.unavailable:
            log(f"{name}: left out: {tool.unavailable}")
        tools.append(tool)
    return tools


# -- data --------------------------------------------------------------------------------
@dataclass
class Originals:
    """What must not survive in an output: the inputs' patient identifiers and UIDs."""

    patient_ids: set[str]
    names: set[str]
    uids: set[str]


def prepare_data(workdir: Path, instances: int, counts: list[int]) -> tuple[dict[int, list[Path]], Path, Originals]:
    """Generated files (cached), read once; shard folders of symlinks per process count; the originals."""
    import pydicom

    gen = workdir / "gen"
    stamp = workdir / "gen.json"
    if read_stamp(stamp).get("instances") != instances or count_files(gen) != instances:
        shutil.rmtree(gen, ignore_errors=True)
        log(f"generating {instances} CT instances into {gen} ...")
        proc = subprocess.run([sys.executable, str(BENCH_DIR / "gen_ct.py"), str(gen), "--instances",
                               str(instances), "--layout", "flat"], capture_output=True, text=True, check=True)
        log(proc.stdout.strip())
        write_stamp(stamp, {"instances": instances})
    files = sorted(gen.glob("*.dcm"))
    nfiles, size = warm_cache(gen)
    log(f"{nfiles} files, {size / 1e6:.0f} MB read (page cache warm)")
    originals = Originals(set(), set(), set())
    tags = ["PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
            "FrameOfReferenceUID"]
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
        originals.patient_ids.add(str(ds.PatientID))
        originals.names.add(str(ds.PatientName))
        originals.uids.update(str(ds.get(t)) for t in tags[2:] if t in ds)
    shards_root = workdir / "shards"
    shutil.rmtree(shards_root, ignore_errors=True)
    shards: dict[int, list[Path]] = {}
    for k in counts:
        shards[k] = []
        for i in range(k):
            folder = shards_root / f"p{k}" / f"s{i}"
            folder.mkdir(parents=True)
            for f in files[i::k]:
                (folder / f.name).symlink_to(f)
            shards[k].append(folder)
    one = shards_root / "one"
    one.mkdir()
    (one / files[0].name).symlink_to(files[0])
    return shards, one, originals


# -- one command -------------------------------------------------------------------------
def run_tool(tool: Tool, shards: list[Path], out: Path, logdir: Path) -> dict:
    """Run ``tool`` once per shard, all at once, into fresh folders under ``out``; time and check it."""
    out.mkdir(parents=True)
    procs, logs, outs = [], [], []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine0 = machine_cpu_s()
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        target = out / f"s{i}"
        target.mkdir()  # deid wants its output folder to exist
        outs.append(target)
        logs.append(logdir / f"{out.name}-s{i}.log")
        with open(logs[-1], "wb") as fh:
            procs.append(subprocess.Popen(tool.command(tool.python, shard, target), stdout=fh,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=tool_env()))
    for p in procs:
        p.wait()
    seconds = time.perf_counter() - t0
    machine = machine_cpu_s() - machine0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    others = max(0.0, machine - cpu) / (seconds * (os.cpu_count() or 1))
    problems, withheld, inner = [], 0, []
    for p, logfile in zip(procs, logs):
        text = logfile.read_text(errors="replace")
        if p.returncode != 0:
            tail = " | ".join(text.strip().splitlines()[-3:])
            problems.append(f"{out.name}: exit {p.returncode}: {tail}")
        for line in reversed(text.strip().splitlines()):
            if line.startswith("{") and '"engine"' in line:  # runner.py's summary
                summary = json.loads(line)
                withheld += summary["withheld"]
                inner.append(summary["seconds"])
                break
    return {"seconds": seconds, "cpu_s": cpu, "others": round(others, 2), "problems": problems, "withheld": withheld,
            "inner_s": max(inner) if inner else None, "outs": outs}


def check_output(outs: list[Path], expected: int, originals: Originals, tag: str) -> list[str]:
    """The output count, and one output file free of the original identifiers."""
    import pydicom

    written = sorted(p for folder in outs for p in folder.rglob("*") if p.is_file())
    problems = []
    if len(written) != expected:
        problems.append(f"{tag}: {len(written)} output files, expected {expected}")
    if written:
        sample = written[len(written) // 2]
        try:
            ds = pydicom.dcmread(sample, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - reported as a problem of the tool
            return problems + [f"{tag}: {sample.name} unreadable: {exc}"]
        left = {str(e.value) for e in ds.iterall()}
        leaks = (left & originals.patient_ids) | (left & originals.names) | (left & originals.uids)
        meta_uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
        if meta_uid in originals.uids:
            leaks.add(meta_uid)
        if leaks:
            problems.append(f"{tag}: {sample.name} still holds {sorted(leaks)[:3]}")
    return problems


# -- report ------------------------------------------------------------------------------
def _median(values: list[float], digits: int) -> float | None:
    return round(statistics.median(values), digits) if values else None


def ratio(table: dict, top: str, bottom: str, k: int) -> float | None:
    a, b = table.get(top, {}).get(k), table.get(bottom, {}).get(k)
    return round(a / b, 2) if a and b else None


def fmt(value: float | None, width: int, digits: int = 1) -> str:
    """``value`` right-aligned, or "-" for none."""
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def print_report(args: argparse.Namespace, tools: list[Tool], counts: list[int], results: list[dict],
                 table: dict, cpu: dict, startup: dict, ratios: dict, cpu_ratios: dict) -> None:
    ok = [t.name for t in tools if not t.unavailable]
    print(f"de-identification of {args.instances} CT (512x512, explicit VR LE, on disk) to files on disk; "
          f"median of {args.runs} run(s); whole commands timed (start to exit)")
    print(f"{'tool':<18}" + "".join(f"{f'files/s {k}p':>13}" for k in counts)
          + "".join(f"{f'CPU ms {k}p':>11}" for k in counts) + f"{'startup s':>11}   runs (files/s, others' CPU)")
    for name in ok:
        every = ", ".join(f"p{r['processes']}:{r['files_s']:.0f} ({r['others']:.0%})"
                          for r in results if r["tool"] == name)
        print(f"{name:<18}" + "".join(fmt(table[name][k], 13) for k in counts)
              + "".join(fmt(cpu[name][k], 11, 2) for k in counts) + f"{fmt(startup.get(name), 11, 2)}   {every}")
    for t in tools:
        if t.unavailable:
            print(f"{t.name:<18}left out: {t.unavailable}")
    for ours in ratios:
        short = "pb" if ours == "pacsbridge" else "pbe"
        for peer, goal in GOALS.items():
            print(f"{short + '/' + peer:<18}" + "".join(fmt(ratios[ours][peer][k], 13, 2) for k in counts)
                  + "".join(fmt(cpu_ratios[ours][peer][k], 11, 2) for k in counts)
                  + f"   ({ours} / {peer}: by files/s, and {peer}'s CPU per file / ours; target >= {goal})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", default=f"1,{os.cpu_count() or 1}",
                        help="process counts, comma-separated (default: 1 and the number of cores)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument("--keep-output", action="store_true", help="keep the outputs (truncated) at the end")
    args = parser.parse_args(argv)
    counts = sorted({int(k) for k in args.processes.split(",")})
    names = [n for n in args.tools.split(",") if n]
    if any(n not in TOOLS for n in names) or any(k < 1 for k in counts) or args.runs < 1:
        parser.error(f"--tools from {','.join(TOOLS)}; --processes >= 1; --runs >= 1")
    args.workdir.mkdir(parents=True, exist_ok=True)

    tools = prepare_tools(names)  # venvs and imports before any clock
    shards, one, originals = prepare_data(args.workdir, args.instances, counts)
    runs_dir = args.workdir / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    logdir = runs_dir / "logs"
    logdir.mkdir(parents=True)
    ready = [t for t in tools if not t.unavailable]
    results: list[dict] = []
    starts: dict[str, list[float]] = {t.name: [] for t in ready}
    problems: list[str] = []
    for run in range(args.runs):
        order = ready[run % len(ready):] + ready[:run % len(ready)] if ready else []
        for tool in order:  # the fixed cost: the command on one file
            res = run_tool(tool, [one], runs_dir / f"{tool.name}-one-r{run}", logdir)
            problems += res["problems"]
            starts[tool.name].append(res["seconds"])
        for k in counts:
            for tool in order:
                tag = f"{tool.name}-p{k}-r{run}"
                busy = wait_quiet(args.quiet_wait)
                create_ms = create_probe(runs_dir / "probes" / tag)
                res = run_tool(tool, shards[k], runs_dir / tag, logdir)
                bad = res["problems"] + check_output(res["outs"], args.instances - res["withheld"], originals, tag)
                truncate_files(runs_dir / tag)
                problems += bad
                rate = args.instances / res["seconds"]
                cpu_ms = round(res["cpu_s"] / args.instances * 1e3, 2)
                results.append({"tool": tool.name, "processes": k, "run": run, "seconds": round(res["seconds"], 2),
                                "files_s": round(rate, 1), "cpu_ms_per_file": cpu_ms, "others": res["others"],
                                "inner_s": res["inner_s"], "withheld": res["withheld"],
                                "cpu_busy_before": busy, "create_ms": create_ms})
                log(f"{tag}: {rate:.1f} files/s ({res['seconds']:.1f} s), {cpu_ms} CPU ms/file, others used "
                    f"{res['others']:.0%} of the CPUs{'; ' + '; '.join(bad) if bad else ''}")
    def medians(key: str, digits: int) -> dict[str, dict[int, float | None]]:
        return {t.name: {k: _median([r[key] for r in results if r["tool"] == t.name and r["processes"] == k],
                                    digits) for k in counts} for t in ready}

    table, cpu = medians("files_s", 1), medians("cpu_ms_per_file", 2)
    startup = {name: _median(values, 2) for name, values in starts.items()}
    mine = [name for name in OURS if name in table]
    ratios = {ours: {peer: {k: ratio(table, ours, peer, k) for k in counts} for peer in GOALS} for ours in mine}
    cpu_ratios = {ours: {peer: {k: ratio(cpu, peer, ours, k) for k in counts} for peer in GOALS} for ours in mine}
    print_report(args, tools, counts, results, table, cpu, startup, ratios, cpu_ratios)
    facts = host_facts(("pydicom",))
    facts["loadavg"] = os.getloadavg()
    print(json.dumps({"benchmark": "deidentify", "instances": args.instances, "runs": args.runs,
                      "timing": "wall clock of whole commands, first start to last exit",
                      "medians_files_s": table, "medians_cpu_ms_per_file": cpu, "startup_s": startup,
                      "ratios": ratios, "cpu_ratios": cpu_ratios, "goals": GOALS,
                      "tools": {t.name: {"version": t.version, "python": str(t.python),
                                         "left_out": t.unavailable or None} for t in tools},
                      "results": results, "problems": problems, "machine": facts}))
    if not args.keep_output:
        shutil.rmtree(runs_dir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
