"""The DICOMweb HTTP layer (shared/nodes/webhttp.py) against a misbehaving server of our own, and a real
Orthanc with its DICOMweb plugin for the happy path."""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pacsbridge.shared.core.errors import (PacsbridgeError, WebCancelled, WebContentError, WebError,
                                           WebRedirectRefused, WebTimeout, WebTruncated)
from pacsbridge.shared.nodes.webhttp import (DICOM_MULTIPART, MultipartBody, RetryPolicy, WebAuth, WebClient,
                                             parse_retry_after, parse_stow_response, read_multipart)

from .helpers import TEST_FILES
from .webserver import (WebServer, answers, json_answer, multipart, multipart_answer, qido_pages,
                        status_answer)

FAST = RetryPolicy(tries=4, max_wait=5.0, backoff=0.05)


@pytest.fixture
def srv():
    with WebServer() as s:
        yield s


def client(srv: WebServer, **kw) -> WebClient:
    kw.setdefault("retry", FAST)
    return WebClient(srv.url + "/dicom-web", **kw)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- multipart reader ---------------------------------------------------------------------------------------
def test_multipart_parts_arrive_as_files_byte_for_byte(srv, tmp_path):
    parts = [os.urandom(1000), b"", os.urandom(3 * 1024 * 1024 + 7)]
    srv.route("/dicom-web/studies/1", multipart_answer(parts))
    with client(srv, chunk_size=4096) as c:
        got = list(c.stream_multipart(c.url("studies", "1"), DICOM_MULTIPART, tmp_path))
    assert [p.path.read_bytes() for p in got] == parts
    assert [p.size for p in got] == [len(p) for p in parts]
    assert all(p.headers["content-type"] == "application/dicom" for p in got)
    assert all(p.path.name.startswith(".part-") and p.path.parent == tmp_path for p in got)
    assert srv.requests[0].headers["accept"] == DICOM_MULTIPART


@pytest.mark.parametrize("quoted", [True, False])
def test_boundary_quoted_or_not(srv, tmp_path, quoted):
    srv.route("/dicom-web/s", multipart_answer([b"one", b"two"], "abc:def", quoted=quoted))
    with client(srv) as c:
        assert [p.path.read_bytes() for p in c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path)] \
            == [b"one", b"two"]


def test_boundary_string_inside_a_payload_does_not_split_it(tmp_path):
    """``--boundary`` without the CRLF before it, and even CRLF--boundary followed by more text, are payload."""
    b = "XyZ"
    payloads = [b"head--XyZ tail", b"a\r\n--XyZmore\r\nstill the same part", b"--XyZ--"]
    body = b"".join(multipart(payloads, b))
    for size in (1, 3, 7, 64, len(body)):  # delimiters straddling every chunk edge
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        got = [p.path.read_bytes() for p in read_multipart(chunks, b, tmp_path)]
        assert got == payloads, size
    assert len(list(tmp_path.iterdir())) == 3 * 5


def test_preamble_padding_and_a_part_without_headers(tmp_path):
    """RFC 2046: a preamble before the first delimiter, white space after a delimiter, a part with no headers."""
    body = (b"this is a preamble\r\n--B \t\r\nContent-Type: application/dicom\r\n\r\none"
            b"\r\n--B\r\n\r\ntwo\r\n--B--\r\nepilogue")
    for size in (1, 5, len(body)):
        got = list(read_multipart([body[i:i + size] for i in range(0, len(body), size)], "B", tmp_path))
        assert [(p.headers, p.path.read_bytes()) for p in got] == \
            [({"content-type": "application/dicom"}, b"one"), ({}, b"two")]


def test_truncated_multipart_is_an_error_and_leaves_no_part_file(srv, tmp_path):
    parts = [os.urandom(5000), os.urandom(200_000)]
    srv.route("/dicom-web/s", multipart_answer(parts, cut=100_000))
    got = []
    with client(srv, chunk_size=8192) as c, pytest.raises(WebTruncated):
        for p in c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path):
            got.append(p)
    assert [p.path.read_bytes() for p in got] == parts[:1]
    assert leftovers(tmp_path) == [got[0].path.name]  # the part in progress is gone


def test_body_ending_cleanly_without_closing_delimiter_is_truncated(srv, tmp_path):
    """A server that closes the connection (no Content-Length) before ``--boundary--``: the last part may be cut."""
    srv.route("/dicom-web/s", lambda h: h.send_stream(
        200, multipart([b"complete", b"maybe not"], "B", close=False), 'multipart/related; boundary=B'))
    with client(srv) as c, pytest.raises(WebTruncated, match="inside part 1"):
        list(c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path))
    assert len(leftovers(tmp_path)) == 1


def test_part_shorter_than_its_content_length_is_truncated(tmp_path):
    body = b"--B\r\nContent-Type: application/dicom\r\nContent-Length: 10\r\n\r\n12345\r\n--B--\r\n"
    with pytest.raises(WebTruncated, match="declared 10"):
        list(read_multipart([body], "B", tmp_path))
    assert leftovers(tmp_path) == []


def test_single_part_where_several_were_expected_is_fine(srv, tmp_path):
    srv.route("/dicom-web/s", multipart_answer([b"only one"]))
    with client(srv) as c:
        got = list(c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path))
    assert [p.path.read_bytes() for p in got] == [b"only one"]


def test_bare_application_dicom_answer_is_one_part(srv, tmp_path):
    srv.route("/dicom-web/s", lambda h: h.send_body(200, b"DICM-ish", "application/dicom"))
    with client(srv) as c:
        (p,) = c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path)
    assert p.path.read_bytes() == b"DICM-ish"


def test_wrong_content_type_says_what_came(srv, tmp_path):
    srv.route("/dicom-web/s", json_answer({"HttpError": "Oops", "Message": "plugin exploded"},
                                          content_type="application/json"))
    with client(srv) as c, pytest.raises(WebContentError, match="application/json.*plugin exploded") as e:
        list(c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path))
    assert isinstance(e.value, PacsbridgeError)
    assert leftovers(tmp_path) == []


def test_multipart_without_boundary_or_with_garbage_start(srv, tmp_path):
    srv.route("/dicom-web/a", lambda h: h.send_body(200, b"x", "multipart/related"))
    srv.route("/dicom-web/b", lambda h: h.send_body(200, b"<html>" * 20000, "multipart/related; boundary=Q"))
    with client(srv) as c:
        with pytest.raises(WebContentError, match="no boundary"):
            list(c.stream_multipart(c.url("a"), DICOM_MULTIPART, tmp_path))
        with pytest.raises(WebContentError, match="no multipart boundary"):
            list(c.stream_multipart(c.url("b"), DICOM_MULTIPART, tmp_path))


def test_406_is_a_web_error_with_its_status(srv, tmp_path):
    srv.route("/dicom-web/s", status_answer(406, body=b"transfer-syntax=* not supported"))
    with client(srv) as c, pytest.raises(WebError, match="not supported") as e:
        list(c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path))
    assert e.value.status == 406 and len(srv.requests) == 1


def test_closing_the_generator_early_deletes_nothing_yielded_and_frees_the_connection(srv, tmp_path):
    srv.route("/dicom-web/s", multipart_answer([b"a" * 10, b"b" * 10]))
    with client(srv) as c:
        gen = c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path)
        first = next(gen)
        gen.close()
        assert first.path.read_bytes() == b"a" * 10
        assert len(leftovers(tmp_path)) == 1


def test_cancel_stops_a_multipart_read(srv, tmp_path):
    cancel = threading.Event()
    srv.route("/dicom-web/s", multipart_answer([b"a" * 100_000, b"b" * 100_000]))
    with client(srv, cancel=cancel, chunk_size=1024) as c:
        gen = c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path)
        next(gen)
        cancel.set()
        with pytest.raises(WebCancelled):
            next(gen)
    assert len(leftovers(tmp_path)) == 1


# -- retries ------------------------------------------------------------------------------------------------
def test_429_honours_retry_after_seconds(srv):
    srv.route("/dicom-web/studies", answers(status_answer(429, {"Retry-After": "1"}), json_answer([{"a": 1}])))
    t0 = time.monotonic()
    with client(srv) as c:
        reply = c.get_json(c.url("studies"))
    assert reply.data == [{"a": 1}]
    assert time.monotonic() - t0 >= 0.9 and len(srv.requests) == 2


def test_503_honours_retry_after_as_http_date(srv):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    srv.route("/dicom-web/studies", answers(status_answer(503, {"Retry-After": when}), json_answer([])))
    t0 = time.monotonic()
    with client(srv) as c:
        assert c.get_json(c.url("studies")).data == []
    assert 0.5 <= time.monotonic() - t0 < 4 and len(srv.requests) == 2


def test_retry_after_is_capped_and_tries_are_counted(srv):
    srv.route("/dicom-web/studies", status_answer(503, {"Retry-After": "3600"}, b"busy"))
    t0 = time.monotonic()
    with client(srv, retry=RetryPolicy(tries=3, max_wait=0.2)) as c, pytest.raises(WebError, match="503") as e:
        c.get_json(c.url("studies"))
    assert e.value.status == 503 and len(srv.requests) == 3
    assert time.monotonic() - t0 < 2


def test_cancel_interrupts_a_retry_wait(srv):
    cancel = threading.Event()
    srv.route("/dicom-web/studies", status_answer(429, {"Retry-After": "30"}))
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with client(srv, cancel=cancel, retry=RetryPolicy(tries=5, max_wait=60)) as c, pytest.raises(WebCancelled):
        c.get_json(c.url("studies"))
    assert time.monotonic() - t0 < 5


def test_500_then_ok_is_retried_with_backoff(srv):
    srv.route("/dicom-web/studies", answers(status_answer(500), status_answer(502), json_answer([1])))
    with client(srv) as c:
        assert c.get_json(c.url("studies")).data == [1]
    assert len(srv.requests) == 3


def test_other_4xx_is_not_retried(srv):
    srv.route("/dicom-web/studies", status_answer(400, body=b"bad query"))
    with client(srv) as c, pytest.raises(WebError, match="400.*bad query") as e:
        c.get_json(c.url("studies"))
    assert e.value.status == 400 and len(srv.requests) == 1


def test_retry_after_parsing():
    assert parse_retry_after("12") == 12
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    assert 9 <= parse_retry_after(email.utils.formatdate(now + 10, usegmt=True), now) <= 11
    assert parse_retry_after(email.utils.formatdate(now - 100, usegmt=True), now) == 0


# -- redirects and auth -------------------------------------------------------------------------------------
def test_redirect_to_same_origin_is_followed_with_credentials(srv):
    srv.route("/dicom-web/studies", status_answer(302, {"Location": "/dicom-web/elsewhere?x=1"}))
    srv.route("/dicom-web/elsewhere", json_answer([7]))
    with client(srv, auth=WebAuth.bearer("tok")) as c:
        assert c.get_json(c.url("studies"), {"PatientID": "P"}).data == [7]
    assert [r.path for r in srv.requests] == ["/dicom-web/studies?PatientID=P", "/dicom-web/elsewhere?x=1"]
    assert all(r.headers["authorization"] == "Bearer tok" for r in srv.requests)


def test_redirect_to_another_origin_is_refused_and_nothing_is_sent_there(srv):
    with WebServer() as other:
        other.route("/steal", json_answer([]))
        srv.route("/dicom-web/studies", status_answer(307, {"Location": other.url + "/steal"}))
        with client(srv, auth=WebAuth.basic("u", "pw")) as c, \
                pytest.raises(WebRedirectRefused, match=f"another origin: {other.url}/steal"):
            c.get_json(c.url("studies"))
        assert other.requests == []
    assert srv.requests[0].headers["authorization"].startswith("Basic ")


def test_redirect_loop_ends(srv):
    srv.route("/dicom-web/a", status_answer(301, {"Location": "/dicom-web/a"}))
    with client(srv) as c, pytest.raises(WebRedirectRefused, match="more than 5"):
        c.get_json(c.url("a"))


def test_urls_outside_the_configured_origins_are_refused():
    with WebServer() as a, WebServer() as b:
        b.route("/x", json_answer([1]))
        with WebClient(a.url, auth=WebAuth.bearer("t")) as c, pytest.raises(WebRedirectRefused):
            c.get_json(b.url + "/x")
        with WebClient(a.url, auth=WebAuth.bearer("t"), also=[b.url + "/qido"]) as c:
            assert c.get_json(b.url + "/x").data == [1]
        assert len(b.requests) == 1


def test_secret_never_in_repr():
    assert "hunter2" not in repr(WebAuth.basic("u", "hunter2"))
    with pytest.raises(ValueError):
        WebClient("http://x", auth=WebAuth("digest"))


# -- timeouts, TLS ------------------------------------------------------------------------------------------
def test_a_hanging_server_times_out(srv):
    srv.route("/dicom-web/studies", lambda h: h.hang())
    t0 = time.monotonic()
    with client(srv, timeout=0.5, retry=RetryPolicy(tries=2, backoff=0.05)) as c, pytest.raises(WebTimeout):
        c.get_json(c.url("studies"))
    assert time.monotonic() - t0 < 5 and len(srv.requests) == 2


def test_a_body_that_stalls_midway_times_out(srv, tmp_path):
    def stall(h):
        h.send_response(200)
        h.send_header("Content-Type", "multipart/related; boundary=B")
        h.send_header("Content-Length", "100000")
        h.end_headers()
        h.wfile.write(b"--B\r\nContent-Type: application/dicom\r\n\r\nstart of the part")
        h.wfile.flush()
        h.hang()
    srv.route("/dicom-web/s", stall)
    with client(srv, timeout=0.5) as c, pytest.raises(WebTimeout):
        list(c.stream_multipart(c.url("s"), DICOM_MULTIPART, tmp_path))
    assert leftovers(tmp_path) == []


def test_unreachable_node_is_a_web_error():
    from .orthanc import free_port
    with WebClient(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(tries=2, backoff=0.01)) as c, \
            pytest.raises(WebError, match="cannot connect"):
        c.get_json(c.url("studies"))


def test_tls_verify_default_and_ca_bundle(tmp_path):
    c = WebClient("https://pacs.example/dicom-web")
    assert c.session.verify is True and c.session.trust_env is False
    assert WebClient("https://pacs.example", verify=False).session.verify is False
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert WebClient("https://pacs.example", ca_bundle=str(ca)).session.verify == str(ca)
    with pytest.raises(WebError, match="CA bundle"):
        WebClient("https://pacs.example", ca_bundle=str(tmp_path / "missing.pem"))
    with pytest.raises(WebError, match="not an http"):
        WebClient("file:///etc/passwd")


# -- QIDO helper server (reused by the searcher's tests) ---------------------------------------------------
def test_qido_pages_and_warning_header(srv):
    items = [{"0020000D": {"vr": "UI", "Value": [str(i)]}} for i in range(5)]
    srv.route("/dicom-web/studies", qido_pages(items, headers={"Warning": '299 pacs "results truncated"'}))
    srv.route("/dicom-web/all", qido_pages(items, honour_limit=False))
    with client(srv) as c:
        page = c.get_json(c.url("studies"), {"limit": 2, "offset": 4})
        assert page.data == items[4:] and page.warnings == ['299 pacs "results truncated"']
        assert c.get_json(c.url("studies"), {"limit": 2, "offset": 5}).data == []
        assert c.get_json(c.url("all"), {"limit": 2}).data == items  # a server ignoring limit


def test_json_expected_but_html_came(srv):
    srv.route("/dicom-web/studies", status_answer(200, body=b"<html>login page</html>", content_type="text/html"))
    with client(srv) as c, pytest.raises(WebContentError, match="login page"):
        c.get_json(c.url("studies"))


def test_a_json_answer_larger_than_the_cap_is_refused(srv):
    srv.route("/dicom-web/studies", json_answer([{"x": "y" * 1000}] * 200))
    with client(srv, max_body_bytes=100_000) as c, pytest.raises(WebContentError, match="larger than 100000"):
        c.get_json(c.url("studies"))


# -- WADO-URI -----------------------------------------------------------------------------------------------
def test_get_to_file(srv, tmp_path):
    data = os.urandom(70_000)
    srv.route("/wado", lambda h: h.send_body(200, data, "application/dicom"))
    srv.route("/cut", lambda h: h.send_body(200, data[:1000], "application/dicom", length=len(data)))
    srv.route("/html", lambda h: h.send_body(200, b"<html>error</html>", "text/html"))
    with WebClient(srv.url, retry=FAST) as c:
        p = c.get_to_file(srv.url + "/wado", "application/dicom", tmp_path,
                          params={"requestType": "WADO", "objectUID": "1.2"})
        assert p.path.read_bytes() == data and p.size == len(data)
        assert srv.requests[-1].query["objectUID"] == ["1.2"]
        with pytest.raises(WebTruncated):
            c.get_to_file(srv.url + "/cut", "application/dicom", tmp_path)
        with pytest.raises(WebContentError, match="text/html.*error"):
            c.get_to_file(srv.url + "/html", "application/dicom", tmp_path)
    assert leftovers(tmp_path) == [p.path.name]


# -- STOW ---------------------------------------------------------------------------------------------------
STOW_ANSWER = {
    "00081190": {"vr": "UR", "Value": ["http://x/studies/1"]},
    "00081199": {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
         "00081155": {"vr": "UI", "Value": ["1.1"]},
         "00081190": {"vr": "UR", "Value": ["http://x/studies/1/series/2/instances/1.1"]}},
        {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
         "00081155": {"vr": "UI", "Value": ["1.2"]},
         "00081196": {"vr": "US", "Value": [45056]}}]},
    "00081198": {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
         "00081155": {"vr": "UI", "Value": ["1.3"]},
         "00081197": {"vr": "US", "Value": [272]}}]},
}


def test_stow_streams_files_and_parses_per_instance_results(srv, tmp_path):
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}.dcm"
        f.write_bytes(os.urandom(10_000 + i))
        files.append(f)
    srv.route("/dicom-web/studies", json_answer(STOW_ANSWER, status=202))
    with client(srv, chunk_size=4096) as c:
        result = c.post_multipart(c.url("studies"), files)
    assert result.status == 202
    assert [(i.sop_instance_uid, i.ok, i.failure_reason, i.warning_reason) for i in result.instances] == \
        [("1.1", True, None, None), ("1.2", True, None, 45056), ("1.3", False, 272, None)]
    assert [i.sop_instance_uid for i in result.failed] == ["1.3"]
    req = srv.requests[0]
    assert req.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert int(req.headers["content-length"]) == len(req.body)  # no chunked encoding
    boundary = req.headers["content-type"].split("boundary=")[1]
    (tmp_path / "back").mkdir()
    got = [p.path.read_bytes() for p in read_multipart([req.body], boundary, tmp_path / "back")]
    assert got == [f.read_bytes() for f in files]


def test_stow_409_all_failed_and_500_retried(srv, tmp_path):
    f = tmp_path / "f.dcm"
    f.write_bytes(b"x" * 100)
    failed = {"00081198": STOW_ANSWER["00081198"]}
    srv.route("/dicom-web/studies", answers(status_answer(500), json_answer(failed, status=409)))
    with client(srv) as c:
        result = c.post_multipart(c.url("studies"), [f])
    assert result.status == 409 and [i.failure_reason for i in result.failed] == [272]
    assert len(srv.requests) == 2 and srv.requests[0].body == srv.requests[1].body  # sent whole again


def test_stow_answer_parsing_edge_cases():
    assert parse_stow_response(200, [{}]).instances == []
    assert parse_stow_response(200, {"00081196": {"vr": "US", "Value": [0xB000]}}).warning_reason == 0xB000
    with pytest.raises(WebContentError):
        parse_stow_response(200, "nope")


def test_multipart_body_length_matches_its_bytes(tmp_path):
    files = [tmp_path / "a", tmp_path / "b"]
    files[0].write_bytes(b"1" * 5)
    files[1].write_bytes(b"")
    body = MultipartBody(files, chunk_size=2)
    data = b"".join(body)
    assert len(data) == len(body) and b"".join(body) == data  # iterable again (a retry)
    files[0].write_bytes(b"1" * 9)
    with pytest.raises(WebError, match="changed size"):
        b"".join(body)


# -- memory ---------------------------------------------------------------------------------------------------
MEMORY_PROBE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pacsbridge.shared.nodes.webhttp import WebClient, DICOM_MULTIPART
    url, folder = sys.argv[1], Path(sys.argv[2])
    c = WebClient(url)
    c.get_json(url + "/warm")  # imports and the session's first connection, before the baseline
    def status(key):  # kB, from /proc/self/status
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as fh:  # resets the peak (VmHWM) to the current RSS: a peak
        fh.write("5")                                # reached before the baseline (imports) hides no growth
    before = status("VmRSS")
    total = n = 0
    if sys.argv[3] == "control":  # 300 MB held at once: proves the probe sees growth (no network: a control
        held = bytearray(300 << 20)  # that read the body whole was seen to finish short on a loaded machine)
        for i in range(0, len(held), 4096):
            held[i] = 1
        total, n = len(held), -1
    else:
        for part in c.stream_multipart(url + "/big", DICOM_MULTIPART, folder):
            total += part.size
            n += 1
            part.path.unlink()
    after = status("VmHWM")
    print(n, total, (after - before) // 1024)
""")


@pytest.mark.slow
def test_a_study_of_several_hundred_mb_streams_in_bounded_memory(srv, tmp_path):
    block = os.urandom(1 << 20)
    part_mb, nparts = 150, 2   # 300 MB, each part far larger than the memory allowed

    def big(h):
        boundary = "BIG"
        head = b"--BIG\r\nContent-Type: application/dicom\r\n\r\n"
        length = nparts * (len(head) + part_mb * len(block) + 2) + len(b"--BIG--\r\n")

        def chunks():
            for _ in range(nparts):
                yield head
                for _ in range(part_mb):
                    yield block
                yield b"\r\n"
            yield b"--BIG--\r\n"
        h.send_stream(200, chunks(), f'multipart/related; type="application/dicom"; boundary={boundary}',
                      length=length)
    srv.route("/dicom-web/big", big)
    srv.route("/dicom-web/warm", json_answer([]))

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, srv.url + "/dicom-web", str(tmp_path), mode],
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr
        return tuple(map(int, out.stdout.split()))

    n, total, growth_mb = probe("stream")
    assert (n, total) == (nparts, nparts * part_mb * len(block))
    assert growth_mb < 50, f"peak RSS grew by {growth_mb} MB"
    assert probe("control")[2] > 250  # the same body read whole


# -- a real archive: Orthanc with its DICOMweb plugin -----------------------------------------------------
COMPRESSED = ("JPEG2000.dcm", "MR_small_jp2klossless.dcm",   # JPEG 2000
              "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm",     # JPEG baseline, extended
              "MR_small_RLE.dcm", "CT_small.dcm")            # RLE, and an uncompressed one


def _one_study(folder: Path) -> list[Path]:
    """pydicom's files as one study (pixel data and transfer syntax untouched)."""
    import pydicom
    from pydicom.uid import generate_uid

    study = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in COMPRESSED:
        ds = pydicom.dcmread(TEST_FILES / name)
        ds.StudyInstanceUID, ds.PatientID = study, "WEB1"
        ds.SOPInstanceUID = generate_uid()  # files shared with other tests must not meet in one archive
        out.append(folder / name)
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def _orthanc_id(pacs, sop: str) -> str:
    found = pacs.request("POST", "/tools/lookup", sop.encode(), "text/plain")
    return next(x["ID"] for x in found if x["Type"] == "Instance")


def test_wado_rs_and_stow_rs_against_orthanc(tmp_path):
    import pydicom

    from .orthanc import Orthanc

    files = _one_study(tmp_path / "src")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert len(syntaxes) >= 4
    with Orthanc(tmp_path / "a", dicomweb=True) as a, Orthanc(tmp_path / "b", aet="ORTHANCB", dicomweb=True) as b:
        assert a.upload(files) == len(files)
        got = tmp_path / "got"
        got.mkdir()
        with WebClient(a.web_url) as c:
            parts = list(c.stream_multipart(c.url("studies", study), DICOM_MULTIPART, got))
            found = c.get_json(c.url("studies"), {"PatientID": "WEB1"}).data
        assert [s["0020000D"]["Value"] for s in found] == [[study]]
        assert len(parts) == len(files)
        for p in parts:
            sop = str(pydicom.dcmread(p.path, stop_before_pixels=True).SOPInstanceUID)
            assert p.path.read_bytes() == a.get(f"/instances/{_orthanc_id(a, sop)}/file"), sop
        # and back: STOW-RS the files as we received them to a second archive
        with WebClient(b.web_url) as c:
            result = c.post_multipart(c.url("studies"), [p.path for p in parts])
        assert result.status == 200 and result.failed == []
        sent = {str(pydicom.dcmread(p.path, stop_before_pixels=True).SOPInstanceUID): p.path for p in parts}
        assert {i.sop_instance_uid for i in result.stored} == set(sent)
        assert b.sop_uids() == set(sent)
        for sop, path in sent.items():
            assert b.get(f"/instances/{_orthanc_id(b, sop)}/file") == path.read_bytes()
