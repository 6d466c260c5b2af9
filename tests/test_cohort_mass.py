"""Mass transfer (issue 17): a year in week chunks with filters, against a real Orthanc.

Orthanc holds generated studies spread over 2024 (and a few just outside it), of several modalities,
body parts, institutions and patient ages. The filters are checked in-process; the mass transfer runs
through real worker processes (Celery, our own throwaway Redis), a real listener for the C-MOVEs, a
node with a rate limit and a move window open now, and its worker is ``kill -9``ed half way: a second
worker finishes it, with every instance of the matching series indexed exactly once (the index dedups
by SOP Instance UID, so the files in storage are counted too) and nothing else pulled.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from pacsbridge.shared.cohorts.mass import MassRequest, chunk_rows
from pacsbridge.shared.cohorts.store import CohortRow, CohortStore
from pacsbridge.shared.core.celeryapp import RUN_JOB_TASK
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.worker import runner

from .helpers import make_instance
from .orthanc import ConnectionSampler, Orthanc
from .test_retrieve import celery_of, ctx_of, index_sops, make_stack, stored_files, wait_finished  # noqa: F401

MODALITIES = ("CT", "MR", "CR", "US")
BODY_PARTS = ("CHEST", "HEAD", "ABDOMEN")
INSTITUTIONS = ("General Hospital", "St Mary Clinic")
DESCRIPTIONS = ("CT THORAX", "MR HEAD ROUTINE", "THORAX FOLLOW-UP", "ABDOMEN")


@dataclasses.dataclass
class Study:
    uid: str
    date: str
    modality: str
    institution: str
    description: str
    age: int                              # years at the study
    series: dict[str, tuple[str, list[str]]]  # series uid -> (body part, SOP instance UIDs)


def make_studies(root: Path, n: int = 40, seed: int = 17) -> list[Study]:
    """``n`` studies over 2024 and 4 outside it (Dec 2023, Jan 2025), one or two series of one to two
    instances each, with their files under ``root``."""
    rng = random.Random(seed)
    out: list[Study] = []
    dates = [dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(366)) for _ in range(n)]
    dates += [dt.date(2023, 12, 28), dt.date(2023, 12, 31), dt.date(2025, 1, 1), dt.date(2025, 1, 3)]
    for k, when in enumerate(dates):
        age = rng.choice((4, 12, 17, 18, 30, 45, 64, 65, 80))
        born = dt.date(when.year - age, 1, 1)  # ``age`` years old on any day of the study's year
        study = Study(uid=generate_uid(), date=f"{when:%Y%m%d}", modality=MODALITIES[k % len(MODALITIES)],
                      institution=INSTITUTIONS[rng.randrange(2)],
                      description=DESCRIPTIONS[k % len(DESCRIPTIONS)], age=age, series={})
        for s in range(rng.choice((1, 2))):
            series, part = generate_uid(), rng.choice(BODY_PARTS)
            sops = []
            for i in range(rng.choice((1, 2))):
                ds = make_instance(root / f"{k}-{s}-{i}.dcm", PatientID=f"MASS{k % 15}", PatientName=f"Mass^{k % 15}",
                                   PatientBirthDate=f"{born:%Y%m%d}", StudyInstanceUID=study.uid,
                                   SeriesInstanceUID=series, StudyDate=study.date, Modality=study.modality,
                                   InstitutionName=study.institution, BodyPartExamined=part,
                                   StudyDescription=study.description,
                                   AccessionNumber=f"M{k:04d}", SeriesNumber=s + 1, InstanceNumber=i + 1)
                sops.append(str(ds.SOPInstanceUID))
            study.series[series] = (part, sops)
        out.append(study)
    return out


def matching(studies: list[Study], *, lo: str = "20240101", hi: str = "20241231", modalities: tuple[str, ...] = (),
             institution: str = "", description: str = "", parts: tuple[str, ...] = (), min_age: int | None = None,
             max_age: int | None = None) -> set[str]:
    """The SOP Instance UIDs a mass transfer with these filters must pull."""
    want: set[str] = set()
    for st in studies:
        if not lo <= st.date <= hi or (modalities and st.modality not in modalities):
            continue
        if institution and not st.institution.upper().startswith(institution.upper().rstrip("*")):
            continue
        if description and description.strip("*") not in st.description:  # "*WORD*" patterns only
            continue
        if (min_age is not None and st.age < min_age) or (max_age is not None and st.age > max_age):
            continue
        for part, sops in st.series.values():
            if not parts or part in parts:
                want.update(sops)
    return want


def mass_cohort(jobs: JobStore, store: CohortStore, mass: dict[str, Any], *, transfer: bool) -> str:
    """A mass-transfer cohort as ``POST /cohorts`` writes it (its rows: one per chunk)."""
    request = MassRequest.model_validate(mass)
    rows = [CohortRow(number=i, cells=cells, spec=spec) for i, (cells, spec) in enumerate(chunk_rows(request), 1)]
    digest = hashlib.sha256(json.dumps([mass, transfer, generate_uid()], sort_keys=True).encode()).hexdigest()
    job, _ = jobs.submit("cohort", {"rows": digest}, node="pacs")
    form = {"format": "json", "headers": ["StudyDate"], "dialect": {"wrapper": "list"}, "mass": True}
    store.create(job.id, format="json", form=form, rows=rows, mass=request.model_dump(by_alias=True),
                 transfer=transfer)
    return job.id


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Study]]:
    root = tmp_path_factory.mktemp("mass-files")
    return root, make_studies(root)


# -- the filters, in-process ------------------------------------------------------------------------
FILTER_CASES = [
    ({"Modality": ["CT"]}, {"modalities": ("CT",)}),
    ({"Modality": ["MR", "US"]}, {"modalities": ("MR", "US")}),
    ({"InstitutionName": "st mary*"}, {"institution": "ST MARY*"}),
    ({"BodyPartExamined": ["HEAD"]}, {"parts": ("HEAD",)}),
    ({"StudyDescription": "*THORAX*"}, {"description": "*THORAX*"}),
    ({"min_age": 18, "max_age": 64}, {"min_age": 18, "max_age": 64}),
    ({"Modality": ["CT", "CR"], "InstitutionName": "General*", "BodyPartExamined": ["CHEST", "ABDOMEN"],
      "max_age": 17}, {"modalities": ("CT", "CR"), "institution": "GENERAL*", "parts": ("CHEST", "ABDOMEN"),
                       "max_age": 17}),
    ({"StudyDescription": "*THORAX*", "Modality": ["CT"]}, {"description": "*THORAX*", "modalities": ("CT",)}),
]


def test_mass_filters_against_orthanc(ctx, tmp_path, generated):
    root, studies = generated
    with Orthanc(tmp_path / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", 11112)}) as pacs:
        pacs.upload(sorted(root.glob("*.dcm")))
        jobs = JobStore(ctx.index.engine)
        jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, retrieve="get", max_associations=4))
        store = CohortStore(ctx.index.engine)
        sampler = ConnectionSampler(pacs.dicom_port).__enter__()
        for filters, expect in FILTER_CASES:
            want = matching(studies, **expect)  # type: ignore[arg-type]
            assert want, filters  # the data covers every case
            cid = mass_cohort(jobs, store, {"from": "2024-01-01", "to": "2024-12-31", "chunk": "week",
                                            "filters": filters}, transfer=False)
            done = runner.run_job(cid, ctx, jobs)
            assert done is not None and done.state == "succeeded", (filters, done and done.error)
            rows = store.rows(cid)
            # a week of several patients is not ambiguous; an empty week is done, not a row to fix
            assert len(rows) == 53 and {r.state for r in rows} == {"found", "done"}, store.counts(cid)
            assert all(r.expected == 0 for r in rows if r.state == "done")
            found = {s["uid"] for r in rows for st in r.studies for s in st["series"]}
            want_series = {uid for st in studies for uid, (_, sops) in st.series.items() if set(sops) & want}
            assert found == want_series, filters
            assert sum(r.expected for r in rows) == len(want), filters
        assert ctx.index.count("Image") == 0  # dry runs move nothing
        sampler.__exit__()
        # the chunks are asked one at a time, though the node would allow 4 associations (seen by the kernel)
        assert sampler.busy and sampler.most == 1, (sampler.most, sampler.peak, sampler.busy, sampler.samples)


def test_a_chunk_the_pacs_cuts_short_is_split_further(ctx, tmp_path):
    """Orthanc answers at most 3 studies a C-FIND. A week of 7 studies on 7 days is asked again by halves
    of its range until no answer is cut short: every study found and pulled. A single day of 4 studies
    cannot be split: that chunk fails and says so; the empty week between them is done."""
    files = tmp_path / "files"
    week: set[str] = set()
    for day in range(7):  # 2024-03-04 .. 03-10
        ds = make_instance(files / f"w{day}.dcm", PatientID=f"CUT{day}", StudyDate=f"202403{4 + day:02d}")
        week.add(str(ds.SOPInstanceUID))
    for k in range(4):  # four studies on 2024-03-20
        make_instance(files / f"d{k}.dcm", PatientID=f"DAY{k}", StudyDate="20240320")
    with Orthanc(tmp_path / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", 11112)},
                 extra_config={"LimitFindResults": 3}) as pacs:
        pacs.upload(sorted(files.glob("*.dcm")))
        jobs = JobStore(ctx.index.engine)
        jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, retrieve="get"))
        store = CohortStore(ctx.index.engine)
        cid = mass_cohort(jobs, store, {"from": "2024-03-04", "to": "2024-03-24", "chunk": "week"}, transfer=True)
        done = runner.run_job(cid, ctx, jobs)
        assert done is not None and done.state == "partial", (done.state, done.error)
        rows = store.rows(cid)
        assert [(r.state, len(r.studies), r.expected, r.received) for r in rows] == [
            ("done", 7, 7, 7), ("done", 0, 0, 0), ("failed", 0, 0, 0)], [(r.state, r.reason) for r in rows]
        assert "single day 2024-03-20" in rows[2].reason and "narrow the query" in rows[2].reason, rows[2].reason
        assert set(index_sops(ctx)) == week and len(index_sops(ctx)) == 7


# -- the mass transfer through real workers, one killed --------------------------------------------
def _running_children(jobs: JobStore, store: CohortStore, cid: str) -> list[str]:
    """The child jobs running for the cohort's chunks being moved."""
    return [c for r in store.rows(cid, states=("transferring",)) for c in r.children
            if jobs.get(c, with_series=False).state == "running"]


def _window_open_now() -> str:
    now = dt.datetime.now()
    return f"{now - dt.timedelta(hours=1):%H}:00-{now + dt.timedelta(hours=2):%H}:00"


def test_mass_transfer_a_year_in_weeks_worker_killed(tmp_path, generated, ctx_of):
    root, studies = generated
    filters = {"Modality": ["CT", "MR", "CR"], "BodyPartExamined": ["CHEST", "HEAD"], "min_age": 18}
    want = matching(studies, modalities=("CT", "MR", "CR"), parts=("CHEST", "HEAD"), min_age=18)
    everything = {sop for st in studies for _, sops in st.series.values() for sop in sops}
    assert 20 <= len(want) < len(everything)
    stack = make_stack(tmp_path, PACSBRIDGE_HEARTBEAT_SECONDS="0.5", PACSBRIDGE_SWEEP_SECONDS="1",
                       PACSBRIDGE_LEASE_SECONDS="3")
    pacs = Orthanc(tmp_path / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", stack.port)}).start()
    try:
        pacs.upload(sorted(root.glob("*.dcm")))
        stack.start("listener")
        first = stack.start("worker-a", "--concurrency", "2")
        ctx = ctx_of(stack)
        jobs = JobStore(ctx.index.engine)
        jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, max_associations=1, max_rate=2.0,
                           move_window=_window_open_now()))
        store = CohortStore(ctx.index.engine)
        cid = mass_cohort(jobs, store, {"from": "20240101", "to": "20241231", "chunk": "week", "filters": filters},
                          transfer=True)
        celery_of(stack).send_task(RUN_JOB_TASK, [cid])

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # some chunks moved (not only empty weeks), one moving now
            moved = [r for r in store.rows(cid, states=("done",)) if r.received]
            if len(moved) >= 3 and _running_children(jobs, store, cid):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no chunk moved: {store.counts(cid)} {jobs.get(cid).error}")
        assert jobs.get(cid).state == "running"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        stack.procs.pop("worker-a")
        # frozen now: almost always a chunk's child retrieve cut short (unless the kill fell in the few
        # milliseconds between a child's end and the next one's start: the rest holds all the same)
        interrupted = _running_children(jobs, store, cid)
        before = len(set(index_sops(ctx)))
        assert 0 < before < len(want)

        # one job slot: the cohort must not wait for a slot that its own interrupted child needs
        stack.start("worker-b", "--job-concurrency", "1")
        done = wait_finished(jobs, cid, timeout=240)
        assert done.state == "succeeded", (done.error, store.counts(cid))
        assert done.attempts == 2

        rows = store.rows(cid)
        assert len(rows) == 53 and {r.state for r in rows} <= {"done"}, store.counts(cid)
        assert {r.state for r in rows if r.expected} == {"done"}
        for c in interrupted:  # the child the kill cut short was finished, not left running
            assert jobs.get(c).state == "succeeded", jobs.get(c).error
        children = [jobs.get(c) for r in rows for c in r.children]
        assert all(j.state == "succeeded" for j in children), [(j.id, j.state, j.error) for j in children]
        assert not [j for j in jobs.list(limit=1000)[0] if j.state in ("queued", "running")]

        sops = index_sops(ctx)
        assert len(sops) == len(set(sops))            # each instance indexed once
        assert set(sops) == want                      # every instance of the matching series, nothing else
        assert len(stored_files(ctx)) == len(want)    # and stored once
        assert sum(r.expected for r in rows) == len(want)
        # the node's rate (2 instances/s, charged per series before its C-MOVE) held across the kill: no
        # stretch of arrivals is faster, beyond a series in flight and the one booked next (2 each at most)
        _, arrivals = ctx.index.run_sql("select arrived_at from pacsbridge_arrivals order by arrived_at")
        times = [float(t) for (t,) in arrivals]
        assert len(times) >= len(want), (len(times), len(want))
        excess = max((j - i + 1) - 2.0 * (times[j] - times[i]) for i in range(len(times))
                     for j in range(i, len(times)))
        assert excess <= 4.5, (excess, len(times), times[-1] - times[0])
    finally:
        stack.close()
        pacs.stop()
