"""``pacsbridge rebuild`` at scale: a streaming walk, ``--missing`` by chunks, and a rebuild killed
partway (``kill -9`` and Ctrl-C) that goes on where it stopped, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from pacsbridge.shared.index import importer as importer_module
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.index.storage import OWN_FOLDERS, Storage

from .conftest import cli_env
from .helpers import make_instance

#: The rebuild in a process of its own, with batches of 20 instead of 500 so that a small tree makes
#: many checkpoints, and held (up to 60 s) just after the first checkpoint that reaches HOLD_AT files
#: so that the test's interrupt always lands mid-rebuild: unheld, a fast rebuild of the small tree
#: could end between the test seeing that checkpoint and sending its signal (CI, once, under load).
#: Set by the test, not by any hook of pacsbridge's: the module's constant and a wrapped method.
_SMALL_BATCHES = """
import sys, time
import pacsbridge.shared.index.importer as m
from pacsbridge.shared.index.resume import Checkpoint
m.BATCH_SIZE = 20
_save, _held = Checkpoint.save, []
def save(self, after, done):
    _save(self, after, done)
    if done >= HOLD_AT and not _held:
        _held.append(done)
        time.sleep(60)  # the test interrupts here
Checkpoint.save = save
from pacsbridge.cli import main
sys.exit(main(sys.argv[1:]))
"""
N_FILES = 1200


def _fill(root: Path, n: int) -> list[str]:
    """``n`` small instances in a patient/study tree under ``root``; their paths in walk order."""
    for i in range(n):
        patient = f"P{i % 40:02d}"
        make_instance(root / patient / f"S{i % 3}" / f"{i:05d}.dcm", rows=1, PatientID=patient,
                      StudyInstanceUID=f"1.2.826.0.1.3680043.10.1.{i % 40}.{i % 3}",
                      SeriesInstanceUID=f"1.2.826.0.1.3680043.10.2.{i % 40}.{i % 3}")
    return list(Storage(root).iter_files())


def _checkpoint(root: Path) -> dict | None:
    found = list((root / ".journal").glob("rebuild-*.json"))
    if not found:
        return None
    try:
        return json.loads(found[0].read_text())
    except (OSError, ValueError):  # being replaced at this moment
        return None


def _object_files(ctx) -> list[str]:
    with ctx.index.engine.connect() as conn:
        return [r[0] for r in conn.execute(text("select ObjectFile from DICOMImages"))]


def _interrupt(settings, sig: int, min_done: int) -> tuple[dict, subprocess.Popen]:
    """Start ``rebuild`` (2 worker processes, batches of 20) and send ``sig`` to its process group once
    its checkpoint says ``min_done`` files are committed. Returns that checkpoint and the process."""
    program = _SMALL_BATCHES.replace("HOLD_AT", str(min_done))
    proc = subprocess.Popen([sys.executable, "-c", program, "rebuild", "--workers", "2", "--format", "json"],
                            env=cli_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    root = Path(settings.storage)
    deadline = time.monotonic() + 120
    try:
        while True:
            seen = _checkpoint(root)
            if seen and seen["done"] >= min_done:
                break
            assert proc.poll() is None, f"the rebuild ended before it was interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint showed progress"
            time.sleep(0.002)
        os.killpg(proc.pid, sig)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return seen, proc


def _resume_and_check(ctx, settings, files: list[str]) -> dict:
    """Run ``rebuild`` again; check it went on from its checkpoint and that each file is indexed once."""
    left = _checkpoint(Path(settings.storage))
    assert left is not None and 0 < left["done"] < len(files)
    assert files.index(left["after"]) == left["done"] - 1  # every file up to it, in walk order
    proc = subprocess.run([sys.executable, "-m", "pacsbridge.cli", "rebuild", "--format", "json"],
                          env=cli_env(settings), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["resumed_after"] == left["after"] and report["done_before"] == left["done"]
    # neither read again nor skipped: this run indexed exactly the files after the checkpoint
    assert report["indexed"] == len(files) - left["done"] and report["rejected"] == 0
    assert report["files_in_storage"] == len(files)
    indexed = _object_files(ctx)
    assert sorted(indexed) == sorted(files)  # each file once, no file twice, none missing
    assert _checkpoint(Path(settings.storage)) is None  # the end was reached: the next one starts afresh
    return report


def test_rebuild_killed_partway_goes_on_where_it_stopped(ctx, settings):
    files = _fill(Path(settings.storage), N_FILES)
    seen, proc = _interrupt(settings, signal.SIGKILL, min_done=100)
    assert proc.returncode == -signal.SIGKILL
    assert 100 <= seen["done"] < N_FILES
    assert ctx.index.count() >= seen["done"]  # what the checkpoint names is committed
    _resume_and_check(ctx, settings, files)
    # once complete, a rebuild reads everything again (and changes nothing)
    again = Importer(ctx.index, ctx.storage, workers=1).rebuild()
    assert again.indexed == N_FILES and not again.resumed_after and ctx.index.count() == N_FILES


def test_rebuild_interrupted_by_ctrl_c_goes_on_where_it_stopped(ctx, settings):
    files = _fill(Path(settings.storage), N_FILES)
    _, proc = _interrupt(settings, signal.SIGINT, min_done=100)
    assert proc.returncode == 130
    _resume_and_check(ctx, settings, files)


def test_restart_and_another_kind_of_run_ignore_the_checkpoint(ctx, settings):
    files = _fill(Path(settings.storage), 300)
    _interrupt_at = files[99]
    from pacsbridge.shared.index.resume import Checkpoint

    database = ctx.index.engine.url.render_as_string(hide_password=True)
    Checkpoint(settings.storage, database, missing=False).save(_interrupt_at, 100)
    report = Importer(ctx.index, ctx.storage, workers=1).rebuild(missing_only=True)  # not --missing's checkpoint
    assert report.indexed == 300 and not report.resumed_after
    assert _checkpoint(Path(settings.storage)) is None  # replaced by this run's, which reached the end
    Checkpoint(settings.storage, database, missing=False).save(_interrupt_at, 100)
    report = Importer(ctx.index, ctx.storage, workers=1).rebuild(restart=True)
    assert report.indexed == 300 and not report.resumed_after
    assert _checkpoint(Path(settings.storage)) is None


def test_missing_compares_the_walk_with_the_index_a_chunk_at_a_time(ctx, settings, monkeypatch):
    files = _fill(Path(settings.storage), 250)
    Importer(ctx.index, ctx.storage, workers=1).rebuild()
    gone = random.Random(7).sample(files, 9)
    with ctx.index.engine.begin() as conn:
        for rel in gone:
            conn.execute(text("delete from DICOMImages where ObjectFile = :f"), {"f": rel})
    asked: list[int] = []
    among = ctx.index.object_files_among
    monkeypatch.setattr(importer_module, "CHUNK", 40)  # chunk edges fall inside the tree
    monkeypatch.setattr(ctx.index, "object_files_among", lambda paths: asked.append(len(paths)) or among(paths))
    report = Importer(ctx.index, ctx.storage, workers=1).rebuild(missing_only=True)
    assert report.indexed == 9 and report.rejected == []
    assert sorted(_object_files(ctx)) == sorted(files)
    assert max(asked) == 40 and sum(asked) == 250  # bounded queries covering the whole walk once


def test_prune_pages_through_the_index(ctx, settings, monkeypatch):
    files = _fill(Path(settings.storage), 120)
    Importer(ctx.index, ctx.storage, workers=1).rebuild()
    for rel in files[5:70:4]:
        (Path(settings.storage) / rel).unlink()
    monkeypatch.setattr(importer_module, "CHUNK", 7)
    report = Importer(ctx.index, ctx.storage, workers=1).rebuild(prune=True)
    assert report.pruned == len(files[5:70:4])
    assert sorted(_object_files(ctx)) == sorted(set(files) - set(files[5:70:4]))


def test_iter_files_is_the_walk_and_starts_past_any_of_its_paths(tmp_path):
    rng = random.Random(3)
    names = ["a", "b", "ab", "a.b", "Z", "_x", "10", "9"]
    for i in range(300):
        parts = [rng.choice(names) for _ in range(rng.randint(1, 4))]
        path = tmp_path.joinpath(*parts[:-1], f"{parts[-1]}f{i % 7}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            pass
    for own in OWN_FOLDERS:
        (tmp_path / own).mkdir(exist_ok=True)
        (tmp_path / own / "inside").write_bytes(b"")
    expected = []
    for folder, dirs, names_ in os.walk(tmp_path):  # the order walk() always had
        rel = os.path.relpath(folder, tmp_path)
        dirs[:] = sorted(d for d in dirs if rel != "." or d not in OWN_FOLDERS)
        expected += [n if rel == "." else f"{rel}/{n}" for n in sorted(names_)]
    storage = Storage(tmp_path)
    assert list(storage.iter_files()) == expected == storage.walk()
    assert len(expected) > 100
    for i, rel in enumerate(expected):
        assert list(storage.iter_files(after=rel)) == expected[i + 1:]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_progress_reports_the_count_of_storage(ctx, settings):
    _fill(Path(settings.storage), 90)
    seen: list[tuple[int, int]] = []
    Importer(ctx.index, ctx.storage, workers=1, progress=lambda d, t: seen.append((d, t))).rebuild()
    assert seen[0][0] == 0 and seen[-1] == (90, 90)


def test_upsert_keeps_every_character_and_coalesces(ctx):
    """PostgreSQL upserts through COPY's text format: backslashes (DICOM's value separator), tabs and
    line ends must come back as they went in, and a value absent from a new copy never erases one."""
    path = ctx.storage.root / "P" / "a.dcm"
    make_instance(path, PatientID="PX", StudyDescription="x")
    importer_module._init(Importer(ctx.index, ctx.storage, workers=1)._job("rebuild"))
    rows = importer_module._process(importer_module.Source(str(path))).rows
    assert rows is not None
    odd = "a\\b\tc\nd\re \\N end\\"
    desc = next(k for k in rows["Study"] if k.lower() == "studydescr")
    rows["Study"][desc] = odd
    rows["Image"]["ObjectFile"] = "P/a b\\c.dcm"
    ctx.index.upsert([rows])
    ctx.index.upsert([rows | {"Study": rows["Study"] | {desc: None}}])  # absent now: the stored value stays
    with ctx.index.engine.connect() as conn:
        assert conn.execute(text(f"select {desc} from DICOMStudies")).scalar_one() == odd
        assert conn.execute(text("select ObjectFile from DICOMImages")).scalar_one() == "P/a b\\c.dcm"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_progress_lines_when_stderr_is_not_a_terminal(ctx, settings):
    """Text mode into a log (not a terminal): a line now and then with files done, of how many, files/s
    and the time left (every 10 s; here every batch, the module's constant set by the test)."""
    _fill(Path(settings.storage), 120)
    code = ("import sys; import pacsbridge.shared.index.importer as m; import pacsbridge.cli as c; "
            "m.BATCH_SIZE = 20; c.PROGRESS_SECONDS = 0; sys.exit(c.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "rebuild", "--workers", "1"], env=cli_env(settings),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rebuild: ")]
    assert lines and lines[-1].startswith("rebuild: 120 of 120 files, "), proc.stderr
    assert any("files/s, about" in line and "left" in line for line in lines), proc.stderr
    assert "120 indexed" in proc.stderr
