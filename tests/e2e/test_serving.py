"""KServe v2 serving against a real `slimserve serve`: health, metadata, JSON and binary inference,
bad input, dynamic batching, deploy / rollback, feedback and metrics.

One server for the module (``served``): the tiny MLP is uploaded once as ``m`` and its job
succeeds, which gives version 1 (the original) and version 2 (the optimized one, the default: the
int8 candidate when it measured faster, else a copy of the original). ``q`` is the same MLP
quantized here by ONNX Runtime (int8, dynamic) before upload, so its version 1 is certainly such a
model. Expected outputs come from ONNX Runtime run here on each version's downloaded ``model.onnx``.
Single requests wait ``QUEUE_DELAY_US`` for company, so concurrent requests reliably share a batch;
tests read the batch-size histogram to see whether a request reached the batcher at all. Tests
that batch different clients' rows together compare numbers on ``m`` version 1 (float: a row's
result does not depend on its batch-mates), or are about exactly that.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import MlpFiles, assert_error, job_config, metric, serving, upload, upload_and_wait
from tests.serverproc import Proc, free_port, wait_for, wait_job

MODEL = "m"
#: How long a lone request waits for others to share its batch (25 ms).
QUEUE_DELAY_US = 25_000
SERVER = {"registry_poll_seconds": "0.2", "max_queue_delay_microseconds": str(QUEUE_DELAY_US), "drain_seconds": "0"}
FEATURES = 16
CLASSES = 4
#: A second model whose uploaded original is the MLP already quantized by ONNX Runtime (int8, dynamic).
QMODEL = "q"


@dataclass
class Served:
    """The module's server, its home, and an ONNX Runtime session per model version (from the downloaded files)."""

    proc: Proc
    home: Path
    sessions: dict[tuple[str, int], ort.InferenceSession] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.proc.url

    def expected(self, version: int, x: np.ndarray, model: str = MODEL) -> np.ndarray:
        """What ONNX Runtime computes here for ``x`` with that version's model file."""
        return np.asarray(self.sessions[(model, version)].run(["logits"], {"x": x})[0])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mlp_files: MlpFiles) -> Iterator[Served]:
    """A server with models ``m`` and ``q`` uploaded, their jobs succeeded and every version loaded."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = tmp_path_factory.mktemp("serving")
    quantized = folder / "q.onnx"
    quantize_dynamic(mlp_files.model, quantized, weight_type=QuantType.QInt8)
    with serving(folder / "home", **SERVER) as proc:
        jobs = upload_and_wait(proc.url, [(MODEL, mlp_files.model), (QMODEL, quantized)], mlp_files.data)
        assert [job["version"] for job in jobs] == [2, 2]
        state = Served(proc, folder / "home")
        paths = [f"/v2/models/{name}/versions/{v}/ready" for name in (MODEL, QMODEL) for v in (1, 2)]
        wait_for(lambda: all(ready(proc.url, path) for path in paths), timeout=60)
        for name in (MODEL, QMODEL):
            for version in (1, 2):
                model_file = httpx.get(f"{proc.url}/v1/models/{name}/versions/{version}/model.onnx", timeout=30)
                assert model_file.status_code == 200, model_file.text
                session = ort.InferenceSession(model_file.content, providers=["CPUExecutionProvider"])
                state.sessions[(name, version)] = session
        yield state


# --------------------------------------------------------------------------- helpers


def ready(url: str, path: str) -> bool:
    """Whether ``GET path`` answers 200."""
    return httpx.get(f"{url}{path}", timeout=10).status_code == 200


def rows(n: int, seed: int) -> np.ndarray:
    """``n`` random rows of input for the MLP."""
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def infer_path(model: str = MODEL, version: int | str | None = None) -> str:
    return f"/v2/models/{model}/infer" if version is None else f"/v2/models/{model}/versions/{version}/infer"


def json_body(x: np.ndarray, request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A curl-style JSON request for input ``x`` (nested data, as a person writes it)."""
    body: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}
    if request_id is not None:
        body["id"] = request_id
    body.update(extra)
    return body


def post_json(url: str, body: Any, path: str = infer_path(), timeout: float = 30.0) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=timeout)


def logits_of(response: httpx.Response) -> np.ndarray:
    """The ``logits`` output of a JSON inference response."""
    assert response.status_code == 200, response.text
    (output,) = [o for o in response.json()["outputs"] if o["name"] == "logits"]
    assert output["datatype"] == "FP32"
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def binary_request(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A body with the binary tensor extension and its headers."""
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def batches(url: str, version: int = 2, model: str = MODEL) -> tuple[float, float]:
    """(executed batches, rows in them) of a version so far, from ``slimserve_inference_batch_size``."""
    text = scrape(url)
    count = metric(text, "slimserve_inference_batch_size_count", model=model, version=str(version))
    total = metric(text, "slimserve_inference_batch_size_sum", model=model, version=str(version))
    assert count is not None and total is not None, "no batch-size series for a loaded version"
    return count, total


def counter(text: str, sample: str, **labels: str) -> float:
    """A counter sample's value (0 when the series does not exist yet)."""
    return metric(text, sample, **labels) or 0.0


def triton_client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=30.0)


def good_request_works(served: Served, seed: int = 99) -> None:
    """A valid request right now is answered 200 with the right numbers."""
    x = rows(1, seed)
    assert_close(logits_of(post_json(served.url, json_body(x))), served.expected(2, x))


# --------------------------------------------------------------------------- health and metadata


def test_upload_gives_versions_1_and_2_with_default_2(served: Served) -> None:
    model = httpx.get(f"{served.url}/v1/models/{MODEL}", timeout=30).json()
    assert model["default_version"] == 2
    assert [(v["number"], v["kind"], v["state"]) for v in model["versions"]] == [
        (1, "original", "ready"),
        (2, "optimized", "ready"),
    ]


def test_health_and_server_metadata(served: Served) -> None:
    live = httpx.get(f"{served.url}/v2/health/live", timeout=10)
    assert (live.status_code, live.json()) == (200, {"live": True})
    ready_now = httpx.get(f"{served.url}/v2/health/ready", timeout=10)
    assert (ready_now.status_code, ready_now.json()) == (200, {"ready": True})
    meta = httpx.get(f"{served.url}/v2", timeout=10).json()
    assert meta["name"] == "slimserve"
    assert isinstance(meta["version"], str) and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("path", ["", "/versions/1", "/versions/2"])
def test_model_metadata(served: Served, path: str) -> None:
    response = httpx.get(f"{served.url}/v2/models/{MODEL}{path}", timeout=10)
    assert response.status_code == 200, response.text
    meta = response.json()
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}]


def test_model_and_version_readiness(served: Served) -> None:
    for path, body in (
        ("/ready", {"name": MODEL, "ready": True}),
        ("/versions/1/ready", {"name": MODEL, "version": "1", "ready": True}),
        ("/versions/2/ready", {"name": MODEL, "version": "2", "ready": True}),
    ):
        response = httpx.get(f"{served.url}/v2/models/{MODEL}{path}", timeout=10)
        assert (response.status_code, response.json()) == (200, body), path
    for path in (
        "/v2/models/nope/ready",
        "/v2/models/nope",
        f"/v2/models/{MODEL}/versions/9/ready",
        f"/v2/models/{MODEL}/versions/9",
        f"/v2/models/{MODEL}/versions/one",
    ):
        assert_error(httpx.get(f"{served.url}{path}", timeout=10), 404, served.home)


def test_tritonclient_health_and_metadata(served: Served) -> None:
    client = triton_client(served.url)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(MODEL)
        assert client.is_model_ready(MODEL, "1")
        assert not client.is_model_ready("nope")
        meta = client.get_model_metadata(MODEL, "1")
        assert meta["inputs"][0]["name"] == "x"
        assert client.get_server_metadata()["name"] == "slimserve"
    finally:
        client.close()


# --------------------------------------------------------------------------- JSON inference


@pytest.mark.parametrize("version", [None, 1, 2])
def test_json_infer_matches_onnxruntime(served: Served, version: int | None) -> None:
    x = rows(3, seed=version or 0)
    response = post_json(served.url, json_body(x, request_id=f"req-{version}"), infer_path(version=version))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["model_name"] == MODEL
    assert body["model_version"] == str(version or 2)
    assert body["id"] == f"req-{version}"
    assert [(o["name"], o["shape"]) for o in body["outputs"]] == [("logits", [3, CLASSES])]
    assert_close(logits_of(response), served.expected(version or 2, x))


def test_json_infer_flat_data_outputs_selection_and_no_id(served: Served) -> None:
    x = rows(2, seed=5)
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, FEATURES], "data": x.ravel().tolist()}],
        "outputs": [{"name": "logits"}],
    }
    response = post_json(served.url, body, infer_path(version=1))
    assert "id" not in response.json()
    assert_close(logits_of(response), served.expected(1, x))


def test_json_request_with_binary_output_by_hand(served: Served) -> None:
    """``binary_data_output`` asks for raw little-endian bytes after a JSON header of the stated length."""
    x = rows(2, seed=6)
    response = post_json(served.url, json_body(x, "bin-out", parameters={"binary_data_output": True}))
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    assert header["id"] == "bin-out"
    (output,) = header["outputs"]
    assert "data" not in output
    size = output["parameters"]["binary_data_size"]
    assert size == len(response.content) - length == 2 * CLASSES * 4
    got = np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])
    assert_close(got, served.expected(2, x))


def test_binary_input_by_hand(served: Served) -> None:
    x = rows(2, seed=7)
    header = {
        "id": "bin-in",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, FEATURES], "parameters": {"binary_data_size": 128}}],
    }
    body, headers = binary_request(header, [x.astype("<f4").tobytes()])
    response = httpx.post(f"{served.url}{infer_path()}", content=body, headers=headers, timeout=30)
    assert response.json()["id"] == "bin-in"
    assert_close(logits_of(response), served.expected(2, x))


# --------------------------------------------------------------------------- tritonclient


@pytest.mark.parametrize("version", ["", "1"])
def test_tritonclient_binary_defaults(served: Served, version: str) -> None:
    """tritonclient's defaults: binary input, and (no outputs named) every output back as binary data."""
    x = rows(3, seed=11)
    client = triton_client(served.url)
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(MODEL, [tensor], model_version=version, request_id="triton-bin")
    finally:
        client.close()
    response = result.get_response()
    assert response["id"] == "triton-bin"
    assert response["model_version"] == (version or "2")
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 3 * CLASSES * 4
    logits = result.as_numpy("logits")
    assert logits is not None and logits.dtype == np.float32
    assert_close(logits, served.expected(int(version or 2), x))


def test_tritonclient_json_tensors(served: Served) -> None:
    x = rows(3, seed=12)
    client = triton_client(served.url)
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=False)
        wanted = triton.InferRequestedOutput("logits", binary_data=False)
        result = client.infer(MODEL, [tensor], outputs=[wanted], request_id="triton-json")
    finally:
        client.close()
    response = result.get_response()
    assert response["id"] == "triton-json"
    assert "data" in response["outputs"][0]
    logits = result.as_numpy("logits")
    assert logits is not None
    assert_close(logits, served.expected(2, x))


def test_tritonclient_error_is_a_clean_400(served: Served) -> None:
    client = triton_client(served.url)
    try:
        tensor = triton.InferInput("x", [1, FEATURES], "FP64")
        tensor.set_data_from_numpy(np.zeros((1, FEATURES), np.float64))
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [tensor])
    finally:
        client.close()
    assert caught.value.status() == "400"
    assert "FP32" in (caught.value.message() or "")


# --------------------------------------------------------------------------- bad input


@dataclass(frozen=True)
class Bad:
    """A refused request: body (JSON object, or raw bytes), headers, path and the status it must get."""

    name: str
    body: Any
    status: int = 400
    path: str = infer_path()
    headers: dict[str, str] = field(default_factory=dict)

    def send(self, url: str) -> httpx.Response:
        content = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        headers = {"Content-Type": "application/json", **self.headers}
        return httpx.post(f"{url}{self.path}", content=content, headers=headers, timeout=30)


def x_input(**overrides: Any) -> dict[str, Any]:
    """The one input, valid unless overridden."""
    return {"name": "x", "datatype": "FP32", "shape": [1, FEATURES], "data": [0.5] * FEATURES, **overrides}


def with_inputs(*inputs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **extra}


def binary_bad(name: str, declared: int, sent: int, *, shape: list[int] | None = None, extra_header: int = 0) -> Bad:
    """A binary-extension request that declares ``declared`` bytes, sends ``sent``, and may lie about its header."""
    header = {"inputs": [x_input(shape=shape or [1, FEATURES], data=None)]}
    del header["inputs"][0]["data"]
    header["inputs"][0]["parameters"] = {"binary_data_size": declared}
    body, headers = binary_request(header, [bytes(sent)])
    headers["Inference-Header-Content-Length"] = str(int(headers["Inference-Header-Content-Length"]) + extra_header)
    return Bad(name, body, headers=headers)


BAD = [
    Bad("data shorter than the shape", with_inputs(x_input(data=[0.5] * (FEATURES - 1)))),
    Bad("data longer than the shape", with_inputs(x_input(data=[0.5] * (FEATURES + 1)))),
    Bad("ragged data", with_inputs(x_input(shape=[2, FEATURES], data=[[0.5] * FEATURES, [0.5] * (FEATURES - 1)]))),
    Bad("data not numbers", with_inputs(x_input(data=["a"] * FEATURES))),
    Bad("data past FP32", with_inputs(x_input(data=[1e39] * FEATURES))),
    Bad("negative dim", with_inputs(x_input(shape=[-1, FEATURES]))),
    Bad("huge dim", with_inputs(x_input(shape=[1 << 40, FEATURES]))),
    Bad("dims overflowing int64", with_inputs(x_input(shape=[2**62, 2**62, 2**62]))),
    Bad("dim past uint64", with_inputs(x_input(shape=[2**64, FEATURES]))),
    Bad("non-integer dim", with_inputs(x_input(shape=[1.0, FEATURES]))),
    Bad("zero rows", with_inputs(x_input(shape=[0, FEATURES], data=[]))),
    Bad("unknown datatype", with_inputs(x_input(datatype="FP128"))),
    Bad("FP64 for FP32", with_inputs(x_input(datatype="FP64"))),
    Bad("INT32 for FP32", with_inputs(x_input(datatype="INT32", data=[1] * FEATURES))),
    Bad("rank 1", with_inputs(x_input(shape=[FEATURES]))),
    Bad("rank 3", with_inputs(x_input(shape=[1, 1, FEATURES]))),
    Bad("wrong fixed dim", with_inputs(x_input(shape=[1, 8], data=[0.5] * 8))),
    Bad("duplicate input", with_inputs(x_input(), x_input())),
    Bad("no inputs", with_inputs()),
    Bad("missing input", with_inputs(x_input(name="y"))),
    Bad("unknown input", with_inputs(x_input(), x_input(name="extra"))),
    Bad("unknown output", with_inputs(x_input(), outputs=[{"name": "probs"}])),
    Bad("output asked twice", with_inputs(x_input(), outputs=[{"name": "logits"}, {"name": "logits"}])),
    Bad("too many outputs", with_inputs(x_input(), outputs=[{"name": f"o{i}"} for i in range(65)])),
    Bad("shared memory asked", with_inputs(x_input(parameters={"shared_memory_region": "r"}))),
    Bad("id not a string", with_inputs(x_input(), id=7)),
    Bad("malformed JSON", b'{"inputs": ['),
    Bad("not an object", b"[1, 2]"),
    Bad("empty body", b""),
    binary_bad("binary header length past the body", 64, 64, extra_header=100),
    binary_bad("binary sizes not adding up", 64, 60),
    binary_bad("binary size wrong for the shape", 60, 60),
    Bad(
        "binary header length not a number",
        with_inputs(x_input()),
        headers={"Inference-Header-Content-Length": "12ab"},
    ),
    Bad(
        "binary data without the header-length header",
        with_inputs({"name": "x", "datatype": "FP32", "shape": [1, FEATURES], "parameters": {"binary_data_size": 64}}),
    ),
    Bad("unknown model", with_inputs(x_input()), 404, infer_path(model="nope")),
    Bad("unknown version", with_inputs(x_input()), 404, infer_path(version=9)),
    Bad("non-numeric version", with_inputs(x_input()), 404, infer_path(version="abc")),
    Bad("version zero", with_inputs(x_input()), 404, infer_path(version=0)),
    Bad("negative version", with_inputs(x_input()), 404, infer_path(version=-1)),
    Bad("model name too long", with_inputs(x_input()), 400, infer_path(model="a" * 65)),
]


@pytest.mark.parametrize("case", BAD, ids=[case.name for case in BAD])
def test_bad_input_is_refused_before_the_batcher(served: Served, case: Bad) -> None:
    before = batches(served.url)
    assert_error(case.send(served.url), case.status, served.home)
    assert batches(served.url) == before, "a refused request reached the batcher"
    good_request_works(served)


def test_compressed_body_is_refused_not_misread(served: Served) -> None:
    """Content-Encoding is not decoded by the infer route: a gzip body must be a clean refusal, never a 500."""
    import gzip

    response = httpx.post(
        f"{served.url}{infer_path()}",
        content=gzip.compress(json.dumps(with_inputs(x_input())).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=30,
    )
    assert "compressed" in assert_error(response, 415, served.home)
    good_request_works(served)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413(served: Served, chunked: bool) -> None:
    limit = 64 << 20  # CodecLimits.max_body_bytes
    chunk = b" " * (1 << 20)

    def chunks() -> Iterator[bytes]:
        for _ in range(limit // len(chunk) + 1):
            yield chunk

    content: bytes | Iterator[bytes] = chunks() if chunked else chunk * (limit // len(chunk) + 1)
    try:
        response = httpx.post(
            f"{served.url}{infer_path()}",
            content=content,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
    except httpx.TransportError as exc:  # the server may answer and close before the client is done sending
        pytest.fail(f"the server cut the connection instead of answering 413: {exc!r}")
    assert_error(response, 413, served.home)
    good_request_works(served)


def test_per_request_timeout_parameter_is_honoured(served: Served) -> None:
    """Triton's per-request ``timeout`` (microseconds): a lone request that cannot start within 1 ms (its batch
    waits 25 ms for company) is answered 503 with Retry-After and never executed.

    On version 1, the float original: version 2 may be an int8-dynamic model, which is not batched across
    requests and so starts at once.
    """
    before = batches(served.url, version=1)
    response = post_json(served.url, json_body(rows(1, 3), parameters={"timeout": 1000}), infer_path(version=1))
    assert_error(response, 503, served.home)
    assert response.headers.get("retry-after", "").isdigit()
    client = triton_client(served.url)
    try:
        tensor = triton.InferInput("x", [1, FEATURES], "FP32")
        tensor.set_data_from_numpy(rows(1, 4))
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [tensor], model_version="1", timeout=1000)
    finally:
        client.close()
    assert caught.value.status() == "503"
    assert batches(served.url, version=1) == before, "a timed-out request was executed"
    x = rows(1, 5)
    assert_close(logits_of(post_json(served.url, json_body(x), infer_path(version=1))), served.expected(1, x))


# --------------------------------------------------------------------------- dynamic batching


def concurrently(url: str, bodies: list[dict[str, Any]], path: str) -> list[httpx.Response]:
    """POST every body at once (connections opened first, then released together by a barrier)."""
    n = len(bodies)
    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(n)]
    start = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        clients[i].get("/v2/health/live")
        start.wait()
        return clients[i].post(path, json=bodies[i])

    try:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))
    finally:
        for client in clients:
            client.close()


def test_concurrent_requests_are_batched_and_split_back_exactly(served: Served) -> None:
    """On version 1 (the float original: a row's result does not depend on the rows beside it)."""
    n = 32
    inputs = [rows(1, seed=1000 + i) for i in range(n)]
    count0, sum0 = batches(served.url, version=1)
    bodies = [json_body(x, request_id=f"batch-{i}") for i, x in enumerate(inputs)]
    answers = concurrently(served.url, bodies, infer_path(version=1))
    count1, sum1 = batches(served.url, version=1)
    for i, response in enumerate(answers):
        assert response.json()["id"] == f"batch-{i}"
        assert_close(logits_of(response), served.expected(1, inputs[i]))
    assert sum1 - sum0 == n, "every row runs exactly once"
    assert count1 - count0 < n, f"{n} concurrent requests ran in {count1 - count0} batches: no batching"


def test_an_answer_does_not_depend_on_its_batch_mates(served: Served) -> None:
    """Batching must be invisible: concurrent with another client's request, a request gets its numbers alone.

    ``q`` version 1 is an int8-dynamic model: ONNX Runtime's DynamicQuantizeLinear takes one scale over
    the whole input tensor, so stacking another client's rows onto a request would change its numbers
    (such a version must not batch across requests, or must quantize row by row).
    """
    path = infer_path(QMODEL, version=1)
    mine = rows(1, seed=2024)
    other = rows(1, seed=2025) * 50.0  # another client's request with a much wider range of values
    alone = {
        name: logits_of(post_json(served.url, json_body(x), path)) for name, x in (("mine", mine), ("other", other))
    }
    assert_close(alone["mine"], served.expected(1, mine, QMODEL))
    assert_close(alone["other"], served.expected(1, other, QMODEL))
    for _ in range(3):
        count0, _ = batches(served.url, 1, QMODEL)
        answers = concurrently(served.url, [json_body(mine), json_body(other)], path)
        count1, _ = batches(served.url, 1, QMODEL)
        together = "in one batch" if count1 - count0 == 1 else "in separate batches"
        batched = logits_of(answers[0])
        assert int(np.argmax(batched)) == int(np.argmax(alone["mine"])), (
            f"the class changed with a batch-mate ({together}): {batched} vs {alone['mine']}"
        )
        assert_close(batched, alone["mine"])
        assert_close(logits_of(answers[1]), alone["other"])


# --------------------------------------------------------------------------- the original, early


@pytest.mark.slow
def test_the_original_is_served_once_validated_before_the_job_ends(served: Served, mlp_files: MlpFiles) -> None:
    """Issue 4: "right after an upload, version 1 (the original, once the sandbox has validated it) is servable"."""
    response = upload(served.url, mlp_files.model, mlp_files.data, job_config("early", latency_seconds=3.0))
    assert response.status_code == 202, response.text
    job_id = response.json()["job"]["id"]

    def job() -> dict[str, Any]:
        return dict(httpx.get(f"{served.url}/v1/jobs/{job_id}", timeout=10).json())

    def past_validation() -> bool:
        now = job()
        assert now["status"] in ("queued", "running"), f"the job ended before it was seen optimizing: {now}"
        return str(now["stage"]).startswith("candidate")  # the original was loaded, checked and measured

    try:
        wait_for(past_validation, timeout=120)
        deadline = time.monotonic() + 10 * float(SERVER["registry_poll_seconds"])
        while not ready(served.url, "/v2/models/early/versions/1/ready") and time.monotonic() < deadline:
            time.sleep(0.1)
        status = job()["status"]
        x = rows(1, seed=31)
        answer = post_json(served.url, json_body(x), infer_path("early", version=1))
        assert answer.status_code == 200 and status == "running", (
            f"version 1 is not servable while the job optimizes (job {status}): {answer.status_code} {answer.text}"
        )
        assert_close(logits_of(answer), served.expected(1, x))  # the same file as m's original
    finally:
        assert wait_job(served.url, job_id)["status"] == "succeeded"


# --------------------------------------------------------------------------- deploy and rollback


def deploy(url: str, version: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{MODEL}/versions/{version}/deploy", timeout=60)


def default_version(url: str) -> str:
    response = post_json(url, json_body(rows(1, 1)))
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def test_deploy_and_rollback_switch_the_default(served: Served) -> None:
    url = served.url
    try:
        response = deploy(url, 1)
        assert response.status_code == 200, response.text
        assert response.json()["default_version"] == 1
        assert default_version(url) == "1"
        assert httpx.get(f"{url}/v1/models/{MODEL}", timeout=30).json()["default_version"] == 1
        assert_error(httpx.post(f"{url}/v1/models/{MODEL}/rollback", timeout=30), 409, served.home)  # none older
        assert deploy(url, 2).status_code == 200
        assert default_version(url) == "2"
        rolled = httpx.post(f"{url}/v1/models/{MODEL}/rollback", timeout=60)
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["default_version"] == 1
        assert default_version(url) == "1"
        assert_error(deploy(url, 9), 404, served.home)
        assert_error(httpx.post(f"{url}/v1/models/nope/versions/1/deploy", timeout=30), 404, served.home)
        assert_error(httpx.post(f"{url}/v1/models/nope/rollback", timeout=30), 404, served.home)
        assert default_version(url) == "1"
    finally:
        deploy(url, 2)
    assert default_version(url) == "2"


def test_deploy_loop_drops_no_request(served: Served) -> None:
    stop = threading.Event()
    seen: dict[str, int] = {}
    failures: list[str] = []

    def hammer() -> None:
        x = rows(1, seed=42)
        with httpx.Client(base_url=served.url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post(infer_path(), json=json_body(x))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                    continue
                version = str(response.json()["model_version"])
                seen[version] = seen.get(version, 0) + 1
                if version == "1":  # version 2's numbers depend on batch-mates (see test_an_answer_does_not_depend...)
                    assert_close(logits_of(response), served.expected(1, x))
                else:
                    assert logits_of(response).shape == (1, CLASSES)

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(hammer) for _ in range(2)]
        try:
            for _ in range(5):
                for version in (1, 2):
                    assert deploy(served.url, version).status_code == 200
                    assert default_version(served.url) == str(version)
        finally:
            stop.set()
        for future in running:
            future.result()
    assert not failures, f"requests failed during deploys: {failures[:5]}"
    assert sum(seen.values()) > 0
    assert default_version(served.url) == "2"


# --------------------------------------------------------------------------- feedback


def feedback(url: str, items: list[dict[str, Any]], model: str = MODEL) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{model}/feedback", json=items, timeout=30)


def predicted_classes(served: Served, version: int, prefix: str, n: int) -> dict[str, int]:
    """Send ``n`` one-row requests with ids to ``version``; the argmax each got, by id."""
    out = {}
    for i in range(n):
        request_id = f"{prefix}-{i}"
        x = rows(1, seed=zlib.crc32(request_id.encode()))
        logits = logits_of(post_json(served.url, json_body(x, request_id), infer_path(version=version)))
        assert int(np.argmax(logits[0])) == int(np.argmax(served.expected(version, x)[0]))
        out[request_id] = int(np.argmax(logits[0]))
    return out


def feedback_counts(url: str, version: int) -> dict[str, float]:
    text = scrape(url)
    return {
        outcome: counter(text, "slimserve_model_feedback_total", model=MODEL, version=str(version), outcome=outcome)
        for outcome in ("correct", "incorrect")
    }


def test_feedback_counts_outcomes_per_version(served: Served) -> None:
    v2 = predicted_classes(served, 2, "fb-two", 5)
    v1 = predicted_classes(served, 1, "fb-one", 2)
    before = {1: feedback_counts(served.url, 1), 2: feedback_counts(served.url, 2)}
    ids2 = sorted(v2)
    items = [{"id": i, "label": v2[i]} for i in ids2[:3]]  # right
    items += [{"id": i, "label": (v2[i] + 1) % CLASSES} for i in ids2[3:]]  # wrong
    items += [{"id": i, "label": v1[i]} for i in v1]  # right, on version 1
    items += [{"id": "never-sent", "label": 0}, {"id": "fb-two-999", "label": 1}]  # unknown
    response = feedback(served.url, items)
    assert response.status_code == 200, response.text
    assert response.json() == {"correct": 5, "incorrect": 2, "unknown": 2}
    after = {1: feedback_counts(served.url, 1), 2: feedback_counts(served.url, 2)}
    assert after[2]["correct"] - before[2]["correct"] == 3
    assert after[2]["incorrect"] - before[2]["incorrect"] == 2
    assert after[1]["correct"] - before[1]["correct"] == 2
    assert after[1]["incorrect"] - before[1]["incorrect"] == 0
    again = feedback(served.url, items[:2])  # a label counts once: those ids are gone now
    assert again.json() == {"correct": 0, "incorrect": 0, "unknown": 2}


def test_feedback_for_a_multi_row_request(served: Served) -> None:
    x = rows(3, seed=77)
    logits = logits_of(post_json(served.url, json_body(x, "fb-rows")))
    labels = [int(c) for c in np.argmax(logits, axis=1)]
    assert feedback(served.url, [{"id": "fb-rows", "label": labels}]).json() == {
        "correct": 1,
        "incorrect": 0,
        "unknown": 0,
    }


def test_feedback_refusals(served: Served) -> None:
    assert_error(feedback(served.url, [{"id": "x", "label": 1}], model="nope"), 404, served.home)
    assert_error(feedback(served.url, [{"label": 1}]), 400, served.home)
    assert_error(feedback(served.url, [{"id": 5, "label": 1}]), 400, served.home)
    assert_error(httpx.post(f"{served.url}/v1/models/{MODEL}/feedback", content=b"{", timeout=30), 400, served.home)


def test_refused_feedback_counts_nothing(served: Served) -> None:
    """A feedback call answered 400 has no effect: its valid items are neither counted nor consumed."""
    classes = predicted_classes(served, 2, "fb-atomic", 2)
    before = feedback_counts(served.url, 2)
    bad: list[dict[str, Any]] = [
        {"id": "fb-atomic-0", "label": classes["fb-atomic-0"]},
        {"id": "fb-atomic-1", "label": [0, 1, 2]},  # three labels for a one-row request
    ]
    assert_error(feedback(served.url, bad), 400, served.home)
    assert feedback_counts(served.url, 2) == before, "a refused feedback call was counted"
    retried = feedback(served.url, [{"id": "fb-atomic-0", "label": classes["fb-atomic-0"]}])
    assert retried.json() == {"correct": 1, "incorrect": 0, "unknown": 0}, "a refused feedback call consumed an id"


# --------------------------------------------------------------------------- metrics


def test_offline_figures_exist_for_every_loaded_version(served: Served) -> None:
    text = scrape(served.url)
    report = httpx.get(f"{served.url}/v1/models/{MODEL}", timeout=30).json()["versions"][1]["summary"]
    assert metric(text, "slimserve_model_accuracy", model=MODEL, version="2") == pytest.approx(report["accuracy"])
    assert metric(text, "slimserve_model_speedup_ratio", model=MODEL, version="2") == pytest.approx(report["speedup"])
    assert metric(text, "slimserve_model_speedup_ratio", model=MODEL, version="1") == pytest.approx(1.0)
    # the original's accuracy was measured too (the report's baseline): dashboards compare both versions
    assert metric(text, "slimserve_model_accuracy", model=MODEL, version="1") == pytest.approx(
        report["baseline_accuracy"]
    )


def test_requests_are_counted_by_code_and_unknown_names_make_no_series(served: Served) -> None:
    before = scrape(served.url)
    for seed in (1, 2):
        assert post_json(served.url, json_body(rows(1, seed)), infer_path(version=1)).status_code == 200
    assert_error(Bad("fp64", with_inputs(x_input(datatype="FP64")), path=infer_path(version=1)).send(served.url), 400)
    made_up = [f"made-up-{i}" for i in range(5)]
    for name in made_up:
        assert_error(post_json(served.url, json_body(rows(1, 1)), infer_path(model=name)), 404)
        assert_error(httpx.get(f"{served.url}/v2/models/{name}", timeout=10), 404)
        assert_error(feedback(served.url, [{"id": "a", "label": 1}], model=name), 404)
    after = scrape(served.url)

    def delta(code: str) -> float:
        labels = {"model": MODEL, "version": "1", "code": code}
        return counter(after, "slimserve_inference_requests_total", **labels) - counter(
            before, "slimserve_inference_requests_total", **labels
        )

    assert delta("200") == 2
    assert delta("400") == 1
    duration = "slimserve_inference_request_duration_seconds_count"
    assert counter(after, duration, model=MODEL, version="1") - counter(before, duration, model=MODEL, version="1") == 3
    for name in made_up:
        assert f'"{name}"' not in after, f"a series was created for the unknown model {name}"
    for family in (
        "slimserve_inference_requests_total",
        "slimserve_inference_request_duration_seconds",
        "slimserve_inference_queue_duration_seconds",
        "slimserve_inference_compute_duration_seconds",
        "slimserve_inference_batch_size",
        "slimserve_inference_queue_depth",
        "slimserve_model_feedback_total",
    ):
        assert f"# TYPE {family} " in after, f"{family} is not exported"


@pytest.mark.slow
def test_metrics_on_a_separate_port(served: Served, tmp_path: Path) -> None:
    """A second replica over the same database and artifacts, with /metrics only on its internal port."""
    port = free_port()
    settings = {
        **SERVER,
        "run_worker": "false",
        "metrics_port": str(port),
        "database_url": f"sqlite:///{served.home / 'slimserve.db'}",
        "storage_url": str(served.home / "artifacts"),
    }
    with serving(tmp_path / "replica", **settings) as replica:
        wait_for(lambda: ready(replica.url, f"/v2/models/{MODEL}/versions/2/ready"), timeout=60)
        x = rows(2, seed=8)
        assert_close(logits_of(post_json(replica.url, json_body(x))), served.expected(2, x))
        assert_error(httpx.get(f"{replica.url}/metrics", timeout=10), 404)
        internal = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert internal.status_code == 200
        text = internal.text
        assert counter(text, "slimserve_inference_requests_total", model=MODEL, version="2", code="200") == 1
        assert metric(text, "slimserve_inference_batch_size_sum", model=MODEL, version="2") == 2


def test_server_answers_right_after_everything(served: Served) -> None:
    """Nothing above left the server degraded: ready, default version 2, right numbers."""
    assert ready(served.url, "/v2/health/ready")
    assert default_version(served.url) == "2"
    good_request_works(served, seed=123)


# --------------------------------------------------------------------------- the fast path and FastAPI's routes agree


def _in_process_answers(home: Path, *, fast_path: bool) -> list[tuple[int, str | None, bytes]]:
    """Each BAD case, a JSON and a binary request, answered by an in-process app on the served home."""
    import asyncio

    from service.app import create_app
    from service.settings import Settings

    x = rows(2, 5)
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, FEATURES], "parameters": {"binary_data_size": x.nbytes}}
        ]
    }
    body, headers = binary_request(header, [x.astype("<f4").tobytes()])
    cases = [*BAD, Bad("json", json_body(x, "r1"), 200), Bad("binary", body, 200, headers=headers)]

    async def run() -> list[tuple[int, str | None, bytes]]:
        app = create_app(Settings(home=home, run_worker=False, registry_poll_seconds=0.2), fast_path=fast_path)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=30) as client:
                async with asyncio.timeout(30):
                    while (await client.get(f"/v2/models/{MODEL}/versions/2/ready")).status_code != 200:
                        await asyncio.sleep(0.05)
                answers = []
                for case in cases:
                    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
                    response = await client.post(
                        case.path, content=content, headers={"Content-Type": "application/json", **case.headers}
                    )
                    assert response.status_code == case.status, (case.name, response.status_code, response.text)
                    answers.append((response.status_code, response.headers.get("content-type"), response.content))
                return answers

    return asyncio.run(run())


def test_fast_path_and_fastapi_routes_answer_alike(served: Served) -> None:
    """``InferFastPath`` answers infer ahead of FastAPI; the routes it shadows (the OpenAPI ones) must agree with it."""
    fast = _in_process_answers(served.home, fast_path=True)
    routed = _in_process_answers(served.home, fast_path=False)
    names = [case.name for case in BAD] + ["json", "binary"]
    for name, (code, kind, content), (code2, kind2, content2) in zip(names, fast, routed, strict=True):
        assert code == code2, name
        assert kind == kind2, name
        if name == "model name too long":  # FastAPI words its path validation differently; both are 400
            continue
        assert content == content2, (name, content, content2)
