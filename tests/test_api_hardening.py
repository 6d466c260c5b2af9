"""The API against hostile input and slow clients (issue 14, items 14 to 16): NUL and lone
surrogates in paths, query strings and bodies, what a read token may see, and gunicorn
held by clients that drip their request."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

from .test_api import (TOKENS, Server, api_settings, app, assert_error, auth, client,  # noqa: F401 - fixtures
                       snapshot)

NODE = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}


# -- item 15: NUL (and other control characters) in path and query parameters ------------------
@pytest.mark.parametrize("method, path, role", [
    ("get", "/api/v1/jobs/%00", "read"),
    ("get", "/api/v1/jobs/ab%00cd", "read"),
    ("post", "/api/v1/jobs/%00/cancel", "user"),
    ("post", "/api/v1/jobs/%00/retry", "user"),
    ("get", "/api/v1/nodes/a%00b", "read"),
    ("put", "/api/v1/nodes/a%00b", "admin"),
    ("patch", "/api/v1/nodes/a%00b", "admin"),
    ("delete", "/api/v1/nodes/a%00b", "admin"),
    ("post", "/api/v1/nodes/a%00b/echo", "user"),
    ("post", "/api/v1/nodes/a%00b/query", "user"),
    ("get", "/api/v1/studies/1.2%00", "read"),
    ("get", "/api/v1/series/1.2%00", "read"),
    ("get", "/api/v1/instances/1.2%00", "read"),
    ("get", "/api/v1/instances/1.2%00/file", "read"),
    ("get", "/api/v1/nodes/a%01b", "read"),
    ("get", "/api/v1/jobs/%ED%A0%80", "read"),          # a UTF-8-encoded lone surrogate
    ("get", "/api/v1/studies?PatientID=a%00b", "read"),
    ("get", "/api/v1/jobs?node=a%00b", "read"),
    ("get", "/api/v1/jobs?a%00b=1", "read"),
])
def test_nul_in_a_path_or_query_parameter_is_400(client, app, method, path, role):
    before = snapshot(app)
    kwargs = {"json": NODE} if method in ("put", "patch") else {}
    if path.endswith("/query"):
        kwargs = {"json": {"PatientID": "x"}}
    err = assert_error(getattr(client, method)(path, headers=auth(role), **kwargs), 400)
    assert "control character" in err["message"] or "NUL" in err["message"] or "UTF-8" in err["message"]
    assert snapshot(app) == before


def test_nul_in_a_path_over_a_real_socket_is_400(tmp_path):
    """gunicorn in front: the same 400 in the one shape, not a 500."""
    s = Server(tmp_path, gunicorn=True)
    try:
        for path in ("/api/v1/jobs/%00", "/api/v1/nodes/a%00b"):
            status, body, _ = s.call("GET", path, role="read")
            assert status == 400 and body["error"]["status"] == 400, (path, body)
    finally:
        s.close()
