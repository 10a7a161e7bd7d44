"""RELIABILITY.md, section "HTTP and protocol", against a real `slimserve serve`: what the other suites leave out.

Already proven elsewhere: the upload's limits by Content-Length, per part and chunked, and a gzip
upload refused (tests/security/test_bad_input.py); the infer body's limit (both ways), a gzip infer
body refused, and every malformed v2 tensor refused before the batcher (tests/e2e/test_serving.py,
tests/security/test_fuzz_codec.py); upload names (test_bad_input.py). Added here:

* every body-taking route refuses every ``Content-Encoding`` (not only gzip), and a declared length
  over the limit is answered at once, before any of the body is sent;
* the server's peak memory stays bounded while clients offer it far more than the limits;
* slow clients: a stalled upload is cut off and leaves nothing; clients that hold connections open
  without finishing their request do not stop others from being served; and they are cut off;
* names in URL paths: ``..``, NUL, control and look-alike unicode characters, too long: 400 on
  every route that takes a model name.

One server for the module: no worker, 100 kB upload limits, every idle timeout at 1 s. After each bad
input, a valid upload is accepted and no row or file is left behind.
"""

from __future__ import annotations

import gzip
import json
import select
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    MlpFiles,
    assert_error,
    home_files,
    job_config,
    model_names,
    multipart_body,
    serving,
    stray_files,
    upload,
)
from tests.security.support import (
    home_of,
    host_port,
    raw_connection,
    read_until_closed,
    refused_cleanly,
    unique,
    valid_upload_accepted,
)
from tests.serverproc import Proc

LIMIT = 100_000  # max_upload_bytes and max_data_bytes
INFER_LIMIT = 64 << 20  # CodecLimits.max_body_bytes
FEEDBACK_LIMIT = 8 << 20  # service.http.routes_serving.MAX_FEEDBACK_BYTES
#: Seconds a test waits for an answer the server owes at once: past it, the server is hanging.
PROMPT = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """No worker, 100 kB part limits, uploads that stall for 1 s cut off, idle connections closed after 1 s."""
    home = tmp_path_factory.mktemp("http-limits") / "home"
    settings = {
        "run_worker": "false",
        "max_upload_bytes": str(LIMIT),
        "max_data_bytes": str(LIMIT),
        "upload_idle_seconds": "1",
        "keep_alive_seconds": "1",
        "drain_seconds": "0",
    }
    with serving(home, **settings) as proc:
        proc.extra["home"] = str(home)
        yield proc


# --------------------------------------------------------------------------- compressed bodies

ENCODINGS = ["gzip", "deflate", "br", "zstd", "GZip", "identity, gzip"]


def _compressed(encoding: str, payload: bytes) -> bytes:
    """The payload really compressed where Python can (gzip, deflate); other encodings carry it as is."""
    if "gzip" in encoding.lower():
        return gzip.compress(payload)
    if encoding == "deflate":
        return zlib.compress(payload)
    return payload


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_compressed_upload_is_415(server: Proc, mlp_files: MlpFiles, encoding: str) -> None:
    """An upload with any Content-Encoding but identity is refused (415) before a byte is staged: the service
    never inflates a body, so no compressed body can expand past the limits. (test_bad_input.py does gzip.)"""
    boundary = "enc-boundary"
    body = multipart_body(
        [("config", None, b'{"name": "enc"}'), ("model", "m.onnx", mlp_files.model.read_bytes())], boundary
    )

    def send() -> httpx.Response:
        headers = {"Content-Encoding": encoding, "Content-Type": f"multipart/form-data; boundary={boundary}"}
        return httpx.post(f"{server.url}/v1/models", content=_compressed(encoding, body), headers=headers, timeout=30)

    assert "compressed" in refused_cleanly(server, mlp_files, send, 415)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_compressed_infer_body_is_415(server: Proc, mlp_files: MlpFiles, encoding: str) -> None:
    """The v2 infer routes refuse every Content-Encoding before reading the body (test_serving.py does gzip on a
    served model; here every encoding, on both infer paths, before the model is even looked up)."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}).encode()
    for path in ("/v2/models/m/infer", "/v2/models/m/versions/1/infer"):

        def send(path: str = path) -> httpx.Response:
            headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
            return httpx.post(f"{server.url}{path}", content=_compressed(encoding, body), headers=headers, timeout=30)

        assert "compressed" in refused_cleanly(server, mlp_files, send, 415)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_feedback_body_is_415(server: Proc, mlp_files: MlpFiles, encoding: str) -> None:
    """Feedback is a body-taking route like upload and infer: a compressed body is refused (415), never misread.
    The deflate case sends the JSON uncompressed under a ``deflate`` label: a server that ignores the label
    reads it anyway."""
    body = json.dumps([{"id": "never-sent", "label": 1}]).encode()
    content = gzip.compress(body) if encoding == "gzip" else body

    def send() -> httpx.Response:
        headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
        return httpx.post(f"{server.url}/v1/models/m/feedback", content=content, headers=headers, timeout=30)

    assert "compressed" in refused_cleanly(server, mlp_files, send, 415)


# --------------------------------------------------------------------------- declared lengths and memory


def _declared_only(server: Proc, path: str, length: int, content_type: str) -> bytes:
    """Send only the request head declaring ``length`` bytes of body; what the server answers (before any body)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()
    with raw_connection(server, head, timeout=PROMPT) as sock:
        try:
            return read_until_closed(sock)
        except TimeoutError:
            pytest.fail(f"no answer within {PROMPT:g} s to a declared length of {length} bytes: the server waits")


@pytest.mark.parametrize(
    ("path", "length", "content_type"),
    [
        pytest.param("/v1/models", 3 * LIMIT + 70_000, "multipart/form-data; boundary=b", id="upload"),
        pytest.param("/v2/models/m/infer", INFER_LIMIT + 1, "application/json", id="infer"),
        pytest.param("/v1/models/m/feedback", FEEDBACK_LIMIT + 1, "application/json", id="feedback"),
    ],
)
def test_a_declared_length_over_the_limit_is_413_before_the_body(
    server: Proc, mlp_files: MlpFiles, path: str, length: int, content_type: str
) -> None:
    """A request head declaring more than the route's limit is answered 413 at once, without the server reading
    (or waiting for) any of the body: the client has sent none of it.

    CVE-2025-23310 / CVE-2025-23311 (Triton: request bodies whose size the client controls drove stack allocations
    in the HTTP server until it overflowed): the size is bounded before anything is read.
    """
    answer = _declared_only(server, path, length, content_type)
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 413"), answer[:300]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert set(body) == {"error"} and "limit" in body["error"], body
    assert stray_files(home_of(server)) == []
    valid_upload_accepted(server, mlp_files)


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _offer(url: str, total: int, headers: dict[str, str], prefix: bytes = b"") -> int | None:
    """Stream ``prefix`` then zeros, ``total`` bytes in 1 MiB chunks (chunked encoding); the status, or None when
    the server closed the connection before the client could read one (it refused early)."""
    chunk = b"\0" * (1 << 20)

    def chunks() -> Iterator[bytes]:
        yield prefix
        for _ in range(total // len(chunk)):
            yield chunk

    try:
        return httpx.post(url, content=chunks(), headers=headers, timeout=60).status_code
    except httpx.TransportError:
        return None


@pytest.mark.slow
def test_memory_stays_bounded_while_clients_offer_far_more_than_the_limits(server: Proc, mlp_files: MlpFiles) -> None:
    """Chunked bodies of 256 MiB offered to the upload (limit ~270 kB) and to feedback (limit 8 MiB): each is
    refused once its running count passes the limit, and the server's peak RSS grows by far less than what was
    offered (it never buffers a body past its limit).

    CVE-2025-23310 / CVE-2025-23311 (Triton: a few MB of chunked body overflowed the HTTP server's stack):
    chunked bodies are counted as they arrive and cut at the limit.
    """
    valid_upload_accepted(server, mlp_files)
    offered = 256 << 20
    before = _peak_rss_bytes(server.popen.pid)
    part = b'--b\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
    upload_status = _offer(
        f"{server.url}/v1/models", offered, {"Content-Type": "multipart/form-data; boundary=b"}, part
    )
    feedback_status = _offer(f"{server.url}/v1/models/m/feedback", offered, {"Content-Type": "application/json"})
    growth = _peak_rss_bytes(server.popen.pid) - before
    assert upload_status in (413, None) and feedback_status in (413, None), (upload_status, feedback_status)
    assert growth < 48 << 20, f"peak RSS grew by {growth >> 20} MiB while 2 x 256 MiB were offered"
    assert server.popen.poll() is None
    assert stray_files(home_of(server)) == []
    valid_upload_accepted(server, mlp_files)


# --------------------------------------------------------------------------- slow clients


def test_a_stalled_upload_is_cut_off_and_leaves_nothing(server: Proc, mlp_files: MlpFiles) -> None:
    """An upload that sends its head and the start of its model part, then nothing, is answered 400 ("stalled")
    once it has been idle for ``SLIMSERVE_UPLOAD_IDLE_SECONDS`` (1 s here); the connection is closed and the part
    already staged is removed."""
    boundary = "stall-boundary"
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + mlp_files.model.read_bytes()[:1000]
    head = (
        f"POST /v1/models HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(start) + 50_000}\r\n\r\n"
    ).encode()

    def send() -> httpx.Response:
        with raw_connection(server, head + start, timeout=30) as sock:
            answer = read_until_closed(sock)  # socket timeout 30 s: a server that never cuts it off fails here
        head_part, _, body = answer.partition(b"\r\n\r\n")
        status = int(head_part.split(b" ", 2)[1])
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    assert "stalled" in refused_cleanly(server, mlp_files, send, 400)


def _slow_clients(server: Proc, count: int) -> list[socket.socket]:
    """``count`` connections that never finish their request: a third send nothing, a third half a request
    head, a third a whole infer head and half its body."""
    heads = [
        b"",
        b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-Slow: ",
        b'POST /v2/models/m/infer HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n{"inputs": [',
    ]
    sockets = []
    for i in range(count):
        sock = socket.create_connection(host_port(server), timeout=30)
        if heads[i % 3]:
            sock.sendall(heads[i % 3])
        sockets.append(sock)
    return sockets


def test_slow_clients_do_not_stop_others_from_being_served(server: Proc, mlp_files: MlpFiles) -> None:
    """While 60 connections hang mid-request (nothing sent, half a head, half a body), other clients are still
    answered: health, a model list, and a valid upload (202)."""
    sockets = _slow_clients(server, 60)
    try:
        assert httpx.get(f"{server.url}/v1/health", timeout=PROMPT).status_code == 200
        assert httpx.get(f"{server.url}/v1/models", timeout=PROMPT).status_code == 200
        valid_upload_accepted(server, mlp_files)
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.slow
def test_slow_clients_are_cut_off(server: Proc) -> None:
    """Slowloris: connections that send nothing, half a request head, or a head and half an infer body are closed
    by the server within ``PROMPT`` (3 s, three times every idle setting of this server), so they cannot pile up
    until the process runs out of descriptors."""
    sockets = _slow_clients(server, 3)
    kinds = ["nothing sent", "half a head", "half an infer body"]
    open_ = dict(zip(sockets, kinds, strict=True))
    deadline = time.monotonic() + PROMPT
    try:
        while open_ and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_), [], [], max(0.0, deadline - time.monotonic()))
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 4"):  # closed, or answered with a refusal
                    open_.pop(sock)
    finally:
        for sock in sockets:
            sock.close()
    assert not open_, f"still open after {PROMPT:g} s: {sorted(open_.values())}"


# --------------------------------------------------------------------------- names in paths

#: Names no model can have, as they appear in a URL path (percent-encoded where needed).
BAD_NAMES = {
    "dotdot": "%2E%2E",
    "dots-inside": "a..b",
    "nul": "a%00b",
    "control": "a%01b",
    "backslash": "a%5Cb",
    "cyrillic-o": "m%D0%BEdel",
    "fullwidth": "%EF%BD%8D%EF%BD%8F%EF%BD%84%EF%BD%85%EF%BD%8C",
    "rtl-override": "a%E2%80%AEb",
    "zero-width-space": "a%E2%80%8Bb",
    "65-chars": "n" * 65,
    "300-chars": "n" * 300,
}
V1_ROUTES = [
    "GET /v1/models/{}",
    "DELETE /v1/models/{}",
    "GET /v1/models/{}/versions/1",
    "GET /v1/models/{}/versions/1/model.onnx",
    "POST /v1/models/{}/versions/1/deploy",
    "POST /v1/models/{}/rollback",
    "POST /v1/models/{}/feedback",
]
V2_ROUTES = [
    "GET /v2/models/{}",
    "GET /v2/models/{}/ready",
    "GET /v2/models/{}/versions/1",
    "GET /v2/models/{}/versions/1/ready",
    "POST /v2/models/{}/infer",
    "POST /v2/models/{}/versions/1/infer",
]
INFER_BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}).encode()
FEEDBACK_BODY = json.dumps([{"id": "never-sent", "label": 1}]).encode()


@pytest.mark.parametrize("route", [*V1_ROUTES, *V2_ROUTES])
def test_a_bad_name_in_the_path_is_400(server: Proc, mlp_files: MlpFiles, route: str) -> None:
    """Every route that takes a model name refuses a name no model can have (``..``, NUL, a control character, a
    backslash, look-alike unicode: Cyrillic, fullwidth, a right-to-left override, a zero-width space; 65 and 300
    characters) with 400 and the one error shape, even with a body that is otherwise valid; the next request is
    served after each, rows and files are unchanged, and a valid upload is accepted after them all. (A ``/`` cannot
    reach a name: it ends the path segment.)

    CVE-2026-24209 (Triton: path traversal through ``../`` in request inputs caused a denial of service): a name is
    checked against the model-name pattern before anything looks it up.
    """
    method, template = route.split()
    home = home_of(server)
    names, files = model_names(home), home_files(home)
    content = FEEDBACK_BODY if template.endswith("feedback") else INFER_BODY if method == "POST" else None
    headers = {"Content-Type": "application/json"} if content is not None else {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for label, name in BAD_NAMES.items():
            response = client.request(method, template.format(name), content=content, headers=headers)
            try:
                assert_error(response, 400, home)
            except AssertionError as exc:
                raise AssertionError(f"{route} with the {label} name: {exc}") from None
            assert client.get("/v1/models").status_code == 200  # the next request is served
    assert model_names(home) == names, "a refused request changed the model rows"
    assert home_files(home) == files, "a refused request changed files"
    valid_upload_accepted(server, mlp_files)


def test_the_server_is_still_well_after_everything(server: Proc, mlp_files: MlpFiles) -> None:
    """The same process is alive, answers, accepts a valid upload, and left no staged file."""
    assert server.popen.poll() is None
    assert httpx.get(f"{server.url}/v1/health", timeout=PROMPT).json() == {"status": "ok"}
    name = unique("last")
    response = upload(server.url, mlp_files.model, mlp_files.data, job_config(name))
    assert response.status_code == 202, response.text
    assert stray_files(home_of(server)) == []
