"""Safe storage: templates, path cleaning, atomic writes, duplicates."""

import os
import subprocess

import pytest

from pacsbridge.shared.core.errors import ConfigError, StorageError, UnsafePath
from pacsbridge.shared.index.storage import PRESETS, Storage, Template, clean_component

from .helpers import make_instance

HOSTILE = ["../../etc", "/abs/olute", "", "x" * 300, "a\x00b", "Ünïcødé", "..\\..\\windows", "..", ".",
           "CON", "a/b/c", "  ", "山田^太郎", "*?:<>|\"", "-rf", "~root"]


@pytest.mark.parametrize("value", HOSTILE)
def test_clean_component_is_one_safe_component(value):
    out = clean_component(value)
    assert out and "/" not in out and "\\" not in out and "\x00" not in out
    assert out not in (".", "..") and not out.startswith("/")
    assert len(out) <= 128
    assert out.isascii()
    assert out.upper() != "CON"


def test_clean_component_keeps_distinct_values_distinct():
    assert clean_component("x" * 300) != clean_component("x" * 299 + "y")
    assert clean_component("山田^太郎") != clean_component("佐藤^花子")
    assert clean_component("12345") == "12345"
    assert clean_component("1.2.840.10008") == "1.2.840.10008"


@pytest.mark.parametrize("patient_id", HOSTILE)
def test_no_patient_id_escapes_the_root(tmp_path, patient_id):
    storage = Storage(tmp_path / "root", fsync=False)
    storage.ensure()
    ds = make_instance(PatientID=patient_id or None)
    result = storage.store(b"DATA", ds)
    stored = (storage.root / result.relpath).resolve()
    assert storage.root.resolve() in stored.parents
    assert stored.read_bytes() == b"DATA"
    assert len(result.relpath) <= 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


@pytest.mark.parametrize("rel", ["../x.dcm", "/etc/passwd", "a/../../x", "", "a//b", "a\x00b"])
def test_absolute_refuses_escapes(tmp_path, rel):
    storage = Storage(tmp_path, fsync=False)
    with pytest.raises(UnsafePath):
        storage.absolute(rel)


def test_symlink_out_of_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = Storage(tmp_path / "root", template="{PatientID}/{SOPInstanceUID}.dcm", fsync=False)
    storage.ensure()
    (storage.root / "EVIL").symlink_to(outside)
    with pytest.raises(UnsafePath):
        storage.store(b"x", make_instance(PatientID="EVIL"))
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("template", ["/abs/{PatientID}", "../{PatientID}", "a//b", "{Patient ID}", "{X|rot13}",
                                      "C:/x", ""])
def test_bad_templates_are_refused(template):
    with pytest.raises(ConfigError):
        Template(template)


def test_presets_render():
    ds = make_instance(PatientID="P1", SeriesNumber=3, InstanceNumber=7, StudyDescription="Chest CT",
                       AccessionNumber="A1")
    sop, study, series = ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID
    assert Template("patient-study-series").render(ds) == f"P1/{study}/{series}/{sop}.dcm"
    assert Template("study").render(ds) == f"{study}/{series}/{sop}.dcm"
    assert Template("flat").render(ds) == f"{sop}.dcm"
    c4 = Template("conquest4").render(ds)
    assert c4.startswith(f"P1/{series}_0003_000007_") and c4.endswith(".dcm")
    px = Template("px-repack").render(ds)
    assert px.startswith("P1-test_patient-19700101/Chest_CT-A1-20240102/00003--") and px.count("/") == 3
    assert Template("%PatientID/%_md5|7_SOPInstanceUID.dcm").render(ds).split("/")[1] == \
        Template("{PatientID}/{SOPInstanceUID|md5:7}.dcm").render(ds).split("/")[1]
    assert set(PRESETS) >= {"patient", "study", "flat", "conquest4"}


def test_long_paths_fit_objectfile(tmp_path):
    uid = "1.2." + "9" * 60
    ds = make_instance(PatientID="P" * 64, StudyInstanceUID=uid, SeriesInstanceUID=uid + "8"[:0],
                       SOPInstanceUID=uid[:-1] + "7")
    rel = Template("patient").render(ds)
    assert len(rel) <= 255 and rel.endswith(".dcm") and rel.count("/") == 3


def test_duplicate_policies(tmp_path):
    ds = make_instance()
    keep = Storage(tmp_path / "k", fsync=False)
    keep.ensure()
    assert keep.store(b"one", ds).action == "stored"
    second = keep.store(b"two", ds)
    assert second.action == "duplicate"
    assert (keep.root / second.relpath).read_bytes() == b"one"

    rep = Storage(tmp_path / "r", duplicates="replace", fsync=False)
    rep.ensure()
    rep.store(b"one", ds)
    res = rep.store(b"two", ds)
    assert res.action == "replaced" and (rep.root / res.relpath).read_bytes() == b"two"

    both = Storage(tmp_path / "b", duplicates="keep-both", fsync=False)
    both.ensure()
    first = both.store(b"one", ds)
    res = both.store(b"two", ds)
    assert res.action == "kept-both" and res.relpath != first.relpath
    assert (both.root / res.relpath).read_bytes() == b"two"
    assert (both.root / first.relpath).read_bytes() == b"one"
    for s in (keep, rep, both):  # no temporary file left behind
        assert list(s.incoming.iterdir()) == []


def test_a_kept_duplicate_is_not_even_written(tmp_path):
    storage = Storage(tmp_path / "k", fsync=True)
    storage.ensure()
    ds = make_instance()
    first = storage.store(b"one", ds)
    closed = open(storage.root / first.relpath, "rb")
    closed.close()  # reading it would raise ValueError
    again = storage.store(closed, ds)
    assert again.action == "duplicate" and again.relpath == first.relpath
    assert storage.store(b"three", ds).size == 5
    assert (storage.root / first.relpath).read_bytes() == b"one"


def test_unwritable_storage_leaves_nothing(tmp_path):
    storage = Storage(tmp_path / "ro", fsync=True)
    storage.ensure()
    ds = make_instance()
    stored = storage.store(b"kept", ds)
    # a file system that refuses writes: a read-only bind is not available to tests, so make the
    # target folder a file: every write below it fails with a real OSError from the kernel
    blocker = storage.root / "BLOCK"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError):
        storage.store(b"new", make_instance(PatientID="BLOCK"))
    assert list(storage.incoming.iterdir()) == []
    assert (storage.root / stored.relpath).read_bytes() == b"kept"


def test_clean_incoming_removes_leftovers(tmp_path):
    storage = Storage(tmp_path, fsync=False)
    storage.ensure()
    (storage.incoming / "in-x.part").write_bytes(b"partial")
    assert storage.clean_incoming() == 1
    assert storage.walk() == []


def _cached_bytes(path):
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--raw", "--noheadings", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_drop_cache_lets_the_pages_of_a_durable_file_go(tmp_path):
    data = os.urandom(1 << 20)
    cached = {}
    for drop in (False, True):
        storage = Storage(tmp_path / f"drop{drop}", fsync=True, drop_cache=drop)
        storage.ensure()
        result = storage.store(data, make_instance())
        cached[drop] = _cached_bytes(storage.root / result.relpath)
        assert (storage.root / result.relpath).read_bytes() == data  # read back from disk, as written
    if cached[False] == 0:
        pytest.skip(f"{tmp_path}: this file system keeps no page cache to drop")
    assert cached[False] >= len(data) // 2
    assert cached[True] == 0


def test_drop_cache_needs_fsync(tmp_path):
    # dirty pages cannot be dropped, and asking would start writeback on every store
    assert Storage(tmp_path, fsync=False, drop_cache=True).drop_cache is False
    assert Storage(tmp_path, fsync=True, drop_cache=True).drop_cache is True


def test_drop_cache_setting():
    from pacsbridge.shared.core.config import load_settings

    assert load_settings({}).drop_cache is True
    assert load_settings({"PACSBRIDGE_DROP_CACHE": "0"}).drop_cache is False
    with pytest.raises(ConfigError):
        load_settings({"PACSBRIDGE_DROP_CACHE": "maybe"})


def test_header_reads_of_the_indexer_do_not_read_ahead(tmp_path):
    # the indexer reads a stored file's header only; without MADV_RANDOM each first touch of the
    # mapping read the kernel's read-around window (128 kB) from disk into fresh cache pages
    from pacsbridge.shared.index.importer import Source, _read

    storage = Storage(tmp_path / "root", fsync=True, drop_cache=True)
    storage.ensure()
    cached = {}
    for whole in (True, False):
        result = storage.store(os.urandom(1 << 20), make_instance(SOPInstanceUID=f"1.2.3.{int(whole)}"))
        path = storage.root / result.relpath
        assert _cached_bytes(path) == 0
        buf = _read(Source(str(path)), whole=whole)
        try:
            assert len(buf[:100]) == 100  # touch the first page, as a header scan does
        finally:
            buf.close()
        cached[whole] = _cached_bytes(path)
    assert cached[False] <= 16 * 1024 < cached[True]


# -- issue 14, item 10: a template's widths and components are bounded when it is made --------
@pytest.mark.parametrize("template", [
    "{PatientID:>50000000}.dcm",  # 43 s and 480 MB of worker memory before
    "{SeriesNumber:0100000000d}.dcm",
    "{PatientID:.100000}/{SOPInstanceUID}.dcm",
    "{SeriesNumber:.100000f}.dcm",  # a float format of a text value: failed at the first render
    "{PatientID:,}.dcm",
    "{PatientID|md5:x}.dcm",  # ValueError at render
    "{PatientID|md5:99}.dcm",  # an MD5 has 32 hex digits
    "x" * 200 + "{PatientID}.dcm",  # one component longer than any stored name
    "/".join(["{PatientID}"] * 40) + ".dcm",  # more folders than ObjectFile can hold
])
def test_unbounded_or_broken_templates_are_refused_when_made(template):
    import time

    from pacsbridge.shared.core.errors import InvalidRequest
    from pacsbridge.shared.jobs.spec import validate

    t0 = time.monotonic()
    with pytest.raises(ConfigError):
        Template(template)
    with pytest.raises(InvalidRequest) as info:  # what POST /jobs calls: a 400 at submit
        validate({"kind": "repack", "selection": {"PatientID": "P1"}, "dest": "d", "template": template})
    assert info.value.field == "template"
    assert time.monotonic() - t0 < 1.0


def test_bounded_templates_still_render():
    ds = make_instance(PatientID="P1", SeriesNumber=3)
    assert Template("{PatientID:_<8}/{SeriesNumber:05d}/{PatientID:.1}{SeriesNumber:x}.dcm").render(ds) == \
        "P1______/00003/P3.dcm"
    assert Template("{PatientID:>128}.dcm").render(ds).endswith("P1.dcm")
    for preset in PRESETS:
        Template(preset)


def test_a_huge_value_renders_fast_and_stays_distinct():
    import time

    t0 = time.monotonic()
    a = Template("{PatientComments}/x.dcm").render(make_instance(PatientComments="A" * 2_000_000 + "1"))
    b = Template("{PatientComments}/x.dcm").render(make_instance(PatientComments="A" * 2_000_000 + "2"))
    assert a != b and len(a.split("/")[0]) <= 128
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("value", ["../x", ".hidden", "..x", ". x"])
def test_a_cleaned_name_never_starts_with_a_dot(value):
    """``../x`` became ``.._x``, a dot folder the storage walk skipped: rebuild --prune dropped its
    rows and the reconciler never saw its files."""
    out = clean_component(value)
    assert not out.startswith(".")
    assert out != clean_component(value.lstrip(".").lstrip())  # still distinct from the value without dots


def test_rebuild_prune_and_the_reconciler_see_dot_named_patients(ctx, tmp_path):
    from pacsbridge.listener.server import reconcile_once
    from pacsbridge.shared.index.importer import Importer

    from .servers import ThrowawayRedis

    files = [make_instance(tmp_path / "in" / f"{i}.dcm", PatientID=pid) for i, pid in enumerate(["../x", ".hidden",
                                                                                                 "plain"])]
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "in"])
    assert ctx.index.count() == 3
    assert not any(part.startswith(".") for rel in ctx.storage.walk() for part in rel.split("/"))
    assert len(ctx.storage.walk()) == 3
    report = Importer(ctx.index, ctx.storage, workers=1).rebuild(prune=True)
    assert report.pruned == 0 and ctx.index.count() == 3
    # a storage written before the fix has such folders: the walk sees them (not .incoming)
    old = ctx.storage.root / ".hidden" / "1.2.3" / "1.2.3.4"
    old.mkdir(parents=True)
    make_instance(old / "old.dcm", PatientID=".hidden")
    (ctx.storage.incoming / "in-leftover.part").write_bytes(b"partial")
    assert ".hidden/1.2.3/1.2.3.4/old.dcm" in ctx.storage.walk()
    assert not any(rel.startswith(".incoming") for rel in ctx.storage.walk())
    with ThrowawayRedis() as server:
        assert reconcile_once(ctx.settings.with_(broker_url=server.url), min_age=0) == 1
    assert Importer(ctx.index, ctx.storage, workers=1).rebuild(missing_only=True).indexed == 1
    assert {r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]} >= {
        d.SOPInstanceUID for d in files}
    assert ctx.index.count() == 4


def test_counter_names_differ_between_processes_with_the_same_pid():
    """Two listener containers on one storage: each receiver has the same pid in its own pid
    namespace, so ``{counter}`` must not be the pid and a count alone (the second instance
    would be kept as a "duplicate" of the first). Made for real with ``unshare --pid``."""
    import shutil
    import sys

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a pid namespace")
    code = ("import os; from pacsbridge.shared.index.storage import Template; "
            "print(os.getpid(), Template('{counter}.dcm').render(None))")
    seen = []
    for _ in range(2):
        out = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", code],
                             capture_output=True, text=True, check=True, timeout=60).stdout.split()
        seen.append(out)
    assert seen[0][0] == seen[1][0] == "1"  # the same pid in both
    assert seen[0][1] != seen[1][1]


def test_the_folders_a_storage_remembers_stay_bounded(tmp_path, monkeypatch):
    """A receiver makes a folder per series for as long as it runs: the folders it remembers as made
    (and as checked to lie inside the root) are forgotten past FOLDER_CACHE, and a forgotten or
    removed folder is made again."""
    from pacsbridge.shared.index import storage as storage_module

    monkeypatch.setattr(storage_module, "FOLDER_CACHE", 8)
    st = Storage(tmp_path / "s", fsync=False)
    st.ensure()
    stored = []
    for _ in range(30):  # 30 series, a folder each
        ds = make_instance()
        rel = st.store(b"x", ds).relpath
        st.absolute(rel)
        stored.append(rel)
        assert len(st._made) <= 8 and len(st._safe_dirs) <= 8
    assert all((st.root / rel).read_bytes() == b"x" for rel in stored)
    # a folder still remembered but removed since (a delete job): made again on the next store
    last = st.root / stored[-1]
    assert last.parent in st._made
    last.unlink()
    last.parent.rmdir()
    again = make_instance(PatientID=ds.PatientID, StudyInstanceUID=ds.StudyInstanceUID,
                          SeriesInstanceUID=ds.SeriesInstanceUID)
    res = st.store(b"y", again)
    assert res.action == "stored" and (st.root / res.relpath).parent == last.parent
    assert (st.root / res.relpath).read_bytes() == b"y"


def test_the_ascii_fast_path_of_clean_component_is_exact():
    # clean_component skips NFKD and the combining-mark walk for ASCII text: that is exact only while
    # every ASCII character is its own NFKD form and none is combining (checked for all 128)
    import unicodedata

    every = "".join(chr(i) for i in range(128))
    assert unicodedata.normalize("NFKD", every) == every
    assert not any(unicodedata.combining(ch) for ch in every)
    assert clean_component("Müller^José") == clean_component("Mu\u0308ller^Jose\u0301")  # the slow path still folds
    assert clean_component("1.2.840.113619.2.55") == "1.2.840.113619.2.55"


def test_a_bad_template_field_is_refused_every_time_though_fields_are_cached():
    for _ in range(2):  # the cache keeps answers, never a refusal
        with pytest.raises(ConfigError, match="unknown filter"):
            Template("{PatientID|nope}/{SOPInstanceUID}.dcm")
