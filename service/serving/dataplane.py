"""The inference data plane: KServe v2 semantics over the registry, with no web framework in sight.

The HTTP layer decodes bytes into an :class:`InferRequest` (``service.protocol``) and calls
:meth:`DataPlane.infer`; this module checks the request against the served version's inputs,
hands the tensors to the version's batcher, picks the requested outputs, records the prediction
for online-accuracy feedback and counts the request. Every refusal is a ServiceError with one line.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimizer.artifact import TensorSpec
from service.errors import BadRequest, NotFound, ServiceError, Unavailable
from service.metrics import ServingMetrics
from service.protocol.codec import numpy_to_datatype
from service.protocol.types import InferRequest, InferResponse, Tensor
from service.serving.feedback import PredictionWindow
from service.serving.loading import LoadedVersion
from service.serving.registry import ModelRegistry

PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class FeedbackResult:
    """Counts of one feedback call."""

    correct: int
    incorrect: int
    unknown: int


class DataPlane:
    """Health, metadata, inference and feedback for every loaded model version."""

    def __init__(self, *, registry: ModelRegistry, metrics: ServingMetrics, window_size: int = 10_000) -> None:
        self.registry = registry
        self.metrics = metrics
        self.window_size = window_size
        self._windows: dict[tuple[str, int], PredictionWindow] = {}
        self.draining = False

    # -- health and metadata --

    def live(self) -> bool:
        """The process answers."""
        return True

    def ready(self) -> bool:
        """Every deployed model is loaded, and the server is not shutting down."""
        return not self.draining and self.registry.ready()

    def server_metadata(self) -> dict[str, Any]:
        """``GET /v2``."""
        from service import __version__

        return {"name": "slimserve", "version": __version__, "extensions": ["binary_tensor_data"]}

    def model_metadata(self, model: str, version: int | None) -> dict[str, Any]:
        """``GET /v2/models/{m}[/versions/{v}]``."""
        served = self.registry.get(model, version)
        return {
            "name": served.model,
            "versions": [str(v) for v in self.registry.versions(model)],
            "platform": PLATFORM,
            "inputs": [_spec_metadata(spec) for spec in served.inputs],
            "outputs": [_spec_metadata(spec) for spec in served.outputs],
        }

    def model_ready(self, model: str, version: int | None) -> bool:
        """Whether that version (or the model's default) is loaded and the server takes requests."""
        if self.draining:
            return False
        try:
            self.registry.get(model, version)
        except Unavailable:
            return False
        return True

    async def start_draining(self) -> None:
        """Shutdown begins: readiness goes false, queued requests are answered 503, running batches finish."""
        self.draining = True
        batchers = []
        for status in self.registry.models():
            for number in self.registry.versions(status.name):
                try:
                    batchers.append(self.registry.get(status.name, number).batcher)
                except ServiceError:
                    continue
        # all at once: each close waits for its running batch, and no queue may wait on another's
        await asyncio.gather(*(batcher.close(drain=False) for batcher in batchers))

    # -- inference --

    async def infer(self, model: str, version: int | None, request: InferRequest) -> InferResponse:
        """Run one request through its version's batcher; ServiceError with one line on refusal."""
        started = time.perf_counter()
        served: LoadedVersion | None = None
        in_flight = None
        code = 500
        try:
            if self.draining:
                raise Unavailable("the server is shutting down", retry_after=1)
            served = self.registry.get(model, version)
            in_flight = self.metrics.entered(served.model, served.version)
            feed = _feed(served, request)
            wanted = _wanted_outputs(served, request)
            timeout = request.parameters.get("timeout")  # Triton's per-request limit, in microseconds
            timeout_s = timeout / 1e6 if isinstance(timeout, int) and timeout > 0 else None
            try:
                outputs = await served.infer(feed, timeout_s=timeout_s)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            response = InferResponse(
                model_name=served.model,
                model_version=str(served.version),
                id=request.id,
                outputs=[
                    Tensor(name, numpy_to_datatype(outputs[name].dtype), tuple(outputs[name].shape), outputs[name], {})
                    for name in wanted
                ],
            )
            if request.id is not None and served.outputs:
                self._window(served).record(request.id, outputs[served.outputs[0].name])
            code = 200
            return response
        except ServiceError as exc:
            code = exc.status
            raise
        finally:
            if in_flight is not None:
                in_flight.dec()
            if served is not None:
                self.metrics.request(served.model, served.version, code, time.perf_counter() - started)

    # -- feedback --

    def feedback(self, model: str, items: list[dict[str, Any]], *, tolerance: float = 1e-3) -> FeedbackResult:
        """Judge ground-truth labels against recent predictions of the model's versions."""
        versions = self.registry.versions(model)
        if not versions:
            raise NotFound("no such model")
        for item in items:  # every item is checked before any is counted: a retry never counts twice
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or item.get("label") is None:
                raise BadRequest('each feedback item needs a string "id" and a "label"')
        windows = [self._windows[(model, n)] for n in versions if (model, n) in self._windows]
        for item in items:  # labels that do not fit their prediction refuse the whole call, before counting
            for window in windows:
                window.check(item["id"], item["label"])
        counts = {"correct": 0, "incorrect": 0, "unknown": 0}
        for item in items:
            request_id, label = item["id"], item["label"]
            outcome, version = "unknown", None
            for number in versions:
                held = self._windows.get((model, number))
                if held is None:
                    continue
                outcome = held.judge(request_id, label, tolerance=tolerance)
                if outcome != "unknown":
                    version = number
                    break
            counts[outcome] += 1
            if version is not None and outcome in ("correct", "incorrect"):
                self.metrics.feedback.labels(model, str(version), outcome).inc()
        return FeedbackResult(**counts)

    def forget(self, model: str, version: int) -> None:
        """Drop an unloaded version's predictions."""
        self._windows.pop((model, version), None)

    def _window(self, served: LoadedVersion) -> PredictionWindow:
        key = (served.model, served.version)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = PredictionWindow(max_items=self.window_size)
        return window


def _spec_metadata(spec: TensorSpec) -> dict[str, Any]:
    shape = [dim if isinstance(dim, int) else -1 for dim in spec.shape]
    return {"name": spec.name, "datatype": numpy_to_datatype(np.dtype(spec.dtype)), "shape": shape}


def _feed(served: LoadedVersion, request: InferRequest) -> dict[str, np.ndarray]:
    """The request's tensors checked against the version's inputs (names, datatypes, ranks, fixed dims)."""
    specs = {spec.name: spec for spec in served.inputs}
    given = {tensor.name: tensor for tensor in request.inputs}
    missing = [name for name in specs if name not in given]
    if missing:
        raise BadRequest(f"missing input {missing[0]!r}; the model takes {', '.join(map(repr, specs))}")
    unknown = [name for name in given if name not in specs]
    if unknown:
        raise BadRequest(f"unknown input {unknown[0]!r}; the model takes {', '.join(map(repr, specs))}")
    feed: dict[str, np.ndarray] = {}
    rows: set[int] = set()
    for name, spec in specs.items():
        tensor = given[name]
        expected = numpy_to_datatype(np.dtype(spec.dtype))
        if tensor.datatype != expected:
            raise BadRequest(f"input {name!r} must be {expected}, got {tensor.datatype}")
        if len(tensor.shape) != len(spec.shape):
            raise BadRequest(f"input {name!r} must have {len(spec.shape)} dimensions, got shape {list(tensor.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise BadRequest(f"input {name!r} must have {want} at axis {axis}, got shape {list(tensor.shape)}")
        if tensor.shape and tensor.shape[0] == 0:
            raise BadRequest(f"input {name!r} holds no rows")
        rows.add(tensor.shape[0] if tensor.shape else 1)
        feed[name] = _strings(name, tensor.data) if tensor.datatype == "BYTES" else tensor.data
    if len(rows) > 1:
        raise BadRequest("every input must have the same number of rows (first axis)")
    return feed


def _strings(name: str, data: np.ndarray) -> np.ndarray:
    """BYTES elements as str: ONNX Runtime would feed ``str(b"ab")`` (the repr) to a string input."""
    try:
        return np.array([item.decode("utf-8") for item in data.ravel()], dtype=object).reshape(data.shape)
    except UnicodeDecodeError:
        raise BadRequest(f"input {name!r} holds bytes that are not UTF-8 text") from None


def _wanted_outputs(served: LoadedVersion, request: InferRequest) -> list[str]:
    names = [spec.name for spec in served.outputs]
    if not request.outputs:
        return names
    wanted = []
    for output in request.outputs:
        if output.name not in names:
            raise BadRequest(f"unknown output {output.name!r}; the model gives {', '.join(map(repr, names))}")
        if output.name in wanted:
            raise BadRequest(f"output {output.name!r} is requested twice")
        wanted.append(output.name)
    return wanted
