"""Jobs under a de-identification project: what a request may ask, what a node allows, what a webhook says."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import insert

from pacsbridge.shared.core.errors import InvalidRequest, UnknownProject
from pacsbridge.shared.core.schema import projects_table
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.jobs.spec import validate
from pacsbridge.shared.jobs.store import JobStore, SeriesProgress

RESEARCH = {"name": "research", "ae_title": "PLATFORM", "host": "127.0.0.1", "port": 11112}
SELECTION = {"PatientID": "MRN-0042"}


@pytest.fixture
def jobs(ctx) -> JobStore:
    store = JobStore(ctx.index.engine)
    with store.engine.begin() as conn:  # a project row as the projects store writes it
        for name in ("lung", "brain"):
            conn.execute(insert(projects_table).values(name=name, description="", config="{}", key_check="x",
                                                       created_by="test", created_at=time.time(),
                                                       updated_at=time.time()))
    return store


def test_a_request_names_a_project_by_its_name_and_a_repack_under_one_cannot_link():
    kind, node, params, _ = validate({"kind": "push", "node": "research", "selection": SELECTION, "project": "lung"})
    assert params == {"selection": {"PatientID": ["MRN-0042"]}, "project": "lung"}
    _, _, params, _ = validate({"kind": "push", "node": "research", "selection": SELECTION})
    assert "project" not in params
    for bad in ("../x", "", "a b", "x" * 65):
        with pytest.raises(InvalidRequest, match="project"):
            validate({"kind": "push", "node": "research", "selection": SELECTION, "project": bad})
    with pytest.raises(InvalidRequest, match="cannot hard-link"):
        validate({"kind": "repack", "selection": SELECTION, "dest": "out", "project": "lung", "link": True})


def test_a_node_for_deidentified_data_only_refuses_a_push_without_a_project(jobs):
    jobs.add_node(Node.from_dict({**RESEARCH, "identifiable": False}))
    with pytest.raises(InvalidRequest, match="de-identified data only"):
        jobs.submit("push", {"selection": SELECTION}, "research")
    job, _ = jobs.submit("push", {"selection": SELECTION, "project": "lung"}, "research")
    assert job.params["project"] == "lung"
    with pytest.raises(UnknownProject, match="nope"):
        jobs.submit("push", {"selection": SELECTION, "project": "nope"}, "research")


def test_a_node_default_project_applies_when_a_push_names_none(jobs):
    jobs.add_node(Node.from_dict({**RESEARCH, "project": "brain", "identifiable": False}))
    job, _ = jobs.submit("push", {"selection": SELECTION}, "research")
    assert job.params["project"] == "brain"  # recorded on the job: a later change of the node changes nothing
    other, _ = jobs.submit("push", {"selection": SELECTION, "project": "lung"}, "research")
    assert other.params["project"] == "lung" and other.id != job.id
    jobs.add_node(Node.from_dict({**RESEARCH, "name": "clinical"}))  # identifiable by default, no project
    plain, _ = jobs.submit("push", {"selection": SELECTION}, "clinical")
    assert "project" not in plain.params


def test_the_webhook_of_a_project_job_carries_no_original_identifier(jobs):
    jobs.add_node(Node.from_dict({**RESEARCH, "project": "lung"}))
    job, _ = jobs.submit("push", {"selection": SELECTION}, "research")
    jobs.set_series(job.id, [SeriesProgress("1.2.840.99.3.1", study_uid="1.2.840.99.2", patient_id="MRN-0042",
                                            description="CHEST SMITH", expected=3)])
    jobs.finish(job.id, "partial", error="1 of 3 not stored; first: 1.2.840.99.4.7: refused",
                result={"selected": 3, "sent": 2, "failed": 1, "failures": [{"sop": "1.2.840.99.4.7"}]})
    body = json.dumps(jobs.get(job.id).to_webhook())
    for original in ("MRN-0042", "1.2.840.99", "SMITH"):
        assert original not in body
    doc = json.loads(body)
    assert doc["project"] == "lung" and doc["result"] == {"selected": 3, "sent": 2, "failed": 1}
    assert doc["totals"]["expected"] == 3 and doc["series"] == 1 and doc["error"]
    jobs.add_node(Node.from_dict({**RESEARCH, "name": "clinical"}))
    plain, _ = jobs.submit("push", {"selection": SELECTION}, "clinical")
    assert "MRN-0042" in json.dumps(jobs.get(plain.id).to_webhook())  # no project: the job as it is
