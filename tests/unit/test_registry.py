"""service.serving.registry on a real SQLite catalog, a real LocalStore and real ONNX Runtime sessions.

Models are tiny MLPs built in code; each seed gives different weights, so an answer tells which
version computed it. Faults are injected only where a test needs one: a corrupt or invalid file,
a store whose download fails or waits, a session whose run waits on a gate.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import pytest
from sqlalchemy import Engine, func, insert, select

from optimizer.artifact import TensorSpec
from optimizer.runtime import RuntimeOptions, create_session
from service.errors import Conflict, NotFound, Unavailable
from service.jobs.records import files_json
from service.jobs.store import JobStore
from service.serving.batcher import BatchingConfig
from service.serving.loading import LoadedVersion
from service.serving.registry import ModelRegistry, VersionStatus
from service.storage.artifacts import LocalStore
from service.storage.catalog import Catalog, FileRef
from service.storage.db import create_db_engine, migrate, models, versions, write_transaction
from tests import builders

T = TypeVar("T")
BOUND_S = 10.0  # generous: each wait below ends in milliseconds when the registry works
X = np.random.default_rng(7).normal(size=(3, 16)).astype(np.float32)


def arun(factory: Callable[[], Awaitable[T]]) -> T:
    """Run one async test body on a fresh event loop, failing instead of hanging."""

    async def bounded() -> T:
        async with asyncio.timeout(60):
            return await factory()

    return asyncio.run(bounded())


async def until(condition: Callable[[], bool]) -> None:
    """Wait (yielding to the loop) until ``condition`` holds; fail past a generous bound."""
    async with asyncio.timeout(BOUND_S):
        while not condition():
            await asyncio.sleep(0.005)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(LocalStore):
    """A LocalStore whose downloads can be made to fail (storage down) or to wait on a gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down = False
        self.gate: threading.Event | None = None
        self.waiting = threading.Event()
        self.downloads = 0

    def get_file(self, key: str, dest: Path) -> None:
        self.downloads += 1
        if self.down:
            raise Unavailable("artifact storage is unreachable")
        if self.gate is not None:
            self.waiting.set()
            assert self.gate.wait(BOUND_S), "the test never opened the gate"
        super().get_file(key, dest)


class GatedSession:
    """Wraps a real session; every run waits on ``gate`` (to hold requests in flight)."""

    def __init__(self, session: Any, gate: threading.Event) -> None:
        self.session = session
        self.gate = gate
        self.started = threading.Event()

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.started.set()
        assert self.gate.wait(BOUND_S), "the test never opened the gate"
        return self.session.run(names, feed)

    def get_providers(self) -> list[str]:
        return self.session.get_providers()


@dataclass
class Listener:
    """Records the registry's events."""

    events: list[tuple[str, str, int]] = field(default_factory=list)

    def loaded(self, v: LoadedVersion) -> None:
        self.events.append(("loaded", v.model, v.version))

    def unloaded(self, model: str, version: int) -> None:
        self.events.append(("unloaded", model, version))


@dataclass
class Env:
    """A catalog and job store on one SQLite file, a local artifact store, and models built per seed."""

    tmp: Path
    engine: Engine
    catalog: Catalog
    jobs: JobStore
    store: FlakyStore
    clock: Clock
    listener: Listener

    def model_file(self, seed: int) -> Path:
        path = self.tmp / "models" / f"mlp-{seed}.onnx"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            builders.mlp_onnx(path, seed=seed)
        return path

    def publish(self, key: str, source: Path) -> FileRef:
        stored = self.store.put_file(key, source)
        return FileRef(stored.key, stored.size, stored.sha256)

    def upload(self, name: str, seeds: tuple[int, int] = (0, 1), *, deploy: bool = True) -> None:
        """Version 1 (seed ``seeds[0]``) and an optimized version 2 (``seeds[1]``), as a worker commits them."""
        prefix = f"{name}-{uuid.uuid4().hex[:8]}"  # random per upload, as the service does
        data = builders.mlp_data(self.tmp / f"{name}.npz")
        self.catalog.create_upload(
            name=name,
            storage_prefix=prefix,
            original_files={"data.npz": self.publish(f"models/{prefix}/uploads/data.npz", data)},
            source_format="onnx",
            job_config={"name": name, "deploy": deploy},
            max_attempts=3,
            idempotency_key=None,
        )
        claim = self.jobs.claim("w1")
        assert claim is not None and claim.job.model_name == name
        number = self.jobs.succeed(
            claim,
            optimized_files={"model.onnx": self.publish(f"models/{prefix}/v2.onnx", self.model_file(seeds[1]))},
            summary={"accuracy": 0.9, "speedup": 2.0},
            original_files={"model.onnx": self.publish(f"models/{prefix}/v1.onnx", self.model_file(seeds[0]))},
        )
        assert number == 2

    def add_version(self, name: str, ref: FileRef | None, state: str = "ready") -> int:
        """Another version row (what a later job would commit), with ``model.onnx`` -> ``ref``."""
        with write_transaction(self.engine) as conn:
            model_id = conn.execute(select(models.c.id).where(models.c.name == name)).scalar_one()
            top = conn.execute(select(func.max(versions.c.number)).where(versions.c.model_id == model_id)).scalar()
            number = int(top or 0) + 1
            conn.execute(
                insert(versions).values(
                    model_id=model_id,
                    number=number,
                    kind="optimized",
                    state=state,
                    files=files_json({"model.onnx": ref} if ref is not None else {}),
                    summary={},
                    created_at=1.0,
                )
            )
        return number

    def registry(self, observers: Callable[[str, int], Any] | None = None, **batching: Any) -> ModelRegistry:
        config = BatchingConfig(**{"max_batch_size": 8, "max_queue_delay_microseconds": 500, **batching})
        return ModelRegistry(
            catalog=self.catalog,
            artifacts=self.store,
            cache_dir=self.tmp / "cache",
            runtime=RuntimeOptions(device="cpu", intra_op_threads=1),
            batching=config,
            listener=self.listener,
            observers=observers,
            clock=self.clock,
        )


@dataclass
class Observer:
    """Records one version's batch sizes (the batcher's metrics hooks)."""

    batches: list[int] = field(default_factory=list)

    def queued(self, seconds: float) -> None:
        pass

    def batch(self, size: int, seconds: float) -> None:
        self.batches.append(size)

    def depth(self, n: int) -> None:
        pass


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'slimserve.db'}")
    migrate(engine)
    yield Env(
        tmp_path,
        engine,
        Catalog(engine),
        JobStore(engine, 30),
        FlakyStore(tmp_path / "artifacts"),
        Clock(),
        Listener(),
    )
    engine.dispose()


_EXPECTED: dict[tuple[int, bytes], np.ndarray] = {}


def expected(env: Env, seed: int, x: np.ndarray = X) -> np.ndarray:
    """The logits of the seed's model for ``x``, from a session of our own."""
    key = (seed, x.tobytes())
    if key not in _EXPECTED:
        session = create_session(env.model_file(seed), RuntimeOptions(device="cpu"))
        _EXPECTED[key] = session.run(None, {"x": x})[0]
    return _EXPECTED[key]


async def logits(served: LoadedVersion, x: np.ndarray = X) -> np.ndarray:
    return (await served.infer({"x": x}))["logits"]


def states(registry: ModelRegistry, name: str) -> dict[int, str]:
    (status,) = [m for m in registry.models() if m.name == name]
    return {v.number: v.state for v in status.versions}


# -- loading and serving --


def test_sync_loads_every_ready_version_and_serves_them(env: Env) -> None:
    env.upload("digits", (0, 1))
    env.catalog.create_upload(  # uploaded, not optimized yet: known, nothing to serve
        name="queued",
        storage_prefix="queued-p",
        original_files={"data.npz": FileRef("k", 1, "0" * 64)},
        source_format="onnx",
        job_config={"name": "queued"},
        max_attempts=3,
        idempotency_key=None,
    )
    registry = env.registry()

    async def body() -> None:
        assert registry.ready() is False
        with pytest.raises(Unavailable, match="starting"):
            registry.get("digits")
        await registry.sync()
        assert registry.ready() is True
        default = registry.get("digits")
        assert (default.model, default.version, default.summary) == ("digits", 2, {"accuracy": 0.9, "speedup": 2.0})
        assert registry.get("digits", 2) is default and registry.get("digits", 1).version == 1
        assert default.inputs == [TensorSpec(name="x", dtype="float32", shape=("batch", 16))]
        assert default.outputs == [TensorSpec(name="logits", dtype="float32", shape=("batch", 4))]
        np.testing.assert_allclose(await logits(default), expected(env, 1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(await logits(registry.get("digits", 1)), expected(env, 0), rtol=1e-5, atol=1e-6)
        assert registry.versions("digits") == [1, 2] and registry.versions("nope") == []
        assert states(registry, "digits") == {1: "ready", 2: "ready"}
        assert states(registry, "queued") == {1: "pending"}
        with pytest.raises(Unavailable, match="no version loaded"):
            registry.get("queued")
        with pytest.raises(Unavailable, match="not loaded"):
            registry.get("queued", 1)
        with pytest.raises(NotFound):
            registry.get("nope")
        with pytest.raises(NotFound):
            registry.get("digits", 9)
        for number in (1, 2):  # the cached copy is the stored file, checksum and all
            ref = env.catalog.get_version("digits", number).files["model.onnx"]
            assert hashlib.sha256(registry.get("digits", number).path.read_bytes()).hexdigest() == ref.sha256
        await registry.sync()  # nothing new: nothing reloaded
        assert env.listener.events == [("loaded", "digits", 2), ("loaded", "digits", 1)]  # the default first
        await registry.close()
        assert registry.ready() is False
        with pytest.raises(Unavailable, match="shutting down"):
            registry.get("digits")
        assert sorted(env.listener.events[2:]) == [("unloaded", "digits", 1), ("unloaded", "digits", 2)]

    arun(body)


def test_concurrent_requests_each_get_their_own_rows(env: Env) -> None:
    env.upload("digits", (0, 1))
    observers: dict[tuple[str, int], Observer] = {}
    registry = env.registry(lambda m, v: observers.setdefault((m, v), Observer()), max_queue_delay_microseconds=20_000)
    rows = [np.random.default_rng(i).normal(size=(1 + i % 3, 16)).astype(np.float32) for i in range(24)]

    async def body() -> None:
        await registry.sync()
        served = registry.get("digits")
        answers = await asyncio.gather(*(logits(served, x) for x in rows))
        for x, answer in zip(rows, answers, strict=True):
            np.testing.assert_allclose(answer, expected(env, 1, x), rtol=1e-5, atol=1e-6)
        assert set(observers) == {("digits", 1), ("digits", 2)}  # one observer per version
        batches = observers[("digits", 2)].batches
        assert sum(batches) == sum(len(x) for x in rows) and max(batches) > 3  # batched, within max_batch_size
        assert max(batches) <= 8
        await registry.close()

    arun(body)


def test_input_the_model_refuses_is_a_value_error(env: Env) -> None:
    env.upload("digits")
    registry = env.registry()

    async def body() -> None:
        await registry.sync()
        with pytest.raises(ValueError, match=r"(?i)dimension|shape|index"):
            await registry.get("digits").infer({"x": np.zeros((2, 15), np.float32)})
        await registry.close()

    arun(body)


def test_a_model_with_a_fixed_batch_axis_is_served_without_batching(env: Env) -> None:
    model = onnx.load(str(env.model_file(3)))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = env.tmp / "fixed.onnx"
    onnx.save(model, str(fixed))
    env.upload("fixed", (0, 0), deploy=False)
    number = env.add_version("fixed", env.publish("fixed/v3.onnx", fixed))
    registry = env.registry()

    async def body() -> None:
        await registry.sync()
        served = registry.get("fixed", number)
        assert served.batcher.config.max_batch_size == 1 and served.inputs[0].shape == (1, 16)
        answers = await asyncio.gather(*(logits(served, X[i : i + 1]) for i in range(3)))
        np.testing.assert_allclose(np.concatenate(answers), expected(env, 3), rtol=1e-5, atol=1e-6)
        assert registry.get("fixed").version == 1  # deploy off: the original serves
        await registry.close()

    arun(body)


# -- failures to load --


def test_a_corrupt_version_fails_to_load_and_the_old_default_keeps_serving(env: Env) -> None:
    env.upload("digits", (0, 1), deploy=False)
    registry = env.registry()
    corrupt = env.publish("digits/v3.onnx", env.model_file(5))
    (env.store.root / corrupt.key).write_bytes(b"not the bytes that were stored")
    invalid = env.tmp / "invalid.onnx"
    invalid.write_bytes(b"this is no ONNX model")

    async def body() -> None:
        await registry.sync()
        assert registry.get("digits").version == 1
        three = env.add_version("digits", corrupt)
        four = env.add_version("digits", env.publish("digits/v4.onnx", invalid))
        five = env.add_version("digits", None)  # a ready row without a model file
        for number in (three, four, five):
            env.catalog.set_default_version("digits", number)
            await registry.sync()
            assert registry.get("digits").version == 1  # the working default stays
            np.testing.assert_allclose(await logits(registry.get("digits")), expected(env, 0), rtol=1e-5, atol=1e-6)
            assert registry.ready() is True  # a broken file does not take the replica out of service
            with pytest.raises(Unavailable, match="failed to load"):
                registry.get("digits", number)
        found = states(registry, "digits")
        assert found[three] == "failed to load: the model file does not match its checksum"
        assert found[four].startswith("failed to load: ONNX Runtime cannot load the model")
        assert found[five] == "failed to load: the version has no model.onnx"
        assert str(env.tmp) not in "".join(found.values())  # no paths reach a client
        downloads = env.store.downloads
        await registry.sync()
        assert env.store.downloads == downloads  # a file that cannot work is not fetched again
        assert not any(event[2] in (three, four, five) for event in env.listener.events)
        (env.store.root / corrupt.key).write_bytes(env.model_file(5).read_bytes())  # storage repaired
        await registry.sync()
        assert registry.get("digits").version == 1  # a sync does not try that file again...
        await registry.deploy("digits", three)  # ...an explicit deploy does
        assert registry.get("digits").version == three and states(registry, "digits")[three] == "ready"
        np.testing.assert_allclose(await logits(registry.get("digits")), expected(env, 5), rtol=1e-5, atol=1e-6)
        await registry.close()

    arun(body)


def test_a_passing_storage_failure_is_retried_later_and_holds_readiness(env: Env) -> None:
    env.upload("digits", (0, 1))
    registry = env.registry()

    async def body() -> None:
        env.store.down = True
        await registry.sync()
        assert registry.ready() is False  # the wanted default may still load
        assert states(registry, "digits")[2] == "failed to load: artifact storage is unreachable"
        with pytest.raises(Unavailable, match="unreachable"):
            registry.get("digits")
        env.store.down = False
        await registry.sync()
        assert registry.ready() is False  # not yet: the retry waits its delay
        env.clock.now += 120
        await registry.sync()
        assert registry.ready() is True and registry.get("digits").version == 2
        await registry.close()

    arun(body)


def test_a_version_still_loading_holds_readiness_while_the_old_one_serves(env: Env) -> None:
    env.upload("digits", (0, 1), deploy=False)
    registry = env.registry()

    async def open_gate(syncing: asyncio.Task[None]) -> None:
        assert env.store.gate is not None
        env.store.gate.set()
        await syncing
        env.store.gate = None
        env.store.waiting.clear()

    async def body() -> None:
        env.store.gate = threading.Event()
        syncing = asyncio.create_task(registry.sync())
        await asyncio.to_thread(env.store.waiting.wait, BOUND_S)
        assert registry.ready() is False  # the first sync is still loading
        await open_gate(syncing)
        assert registry.ready() is True and registry.get("digits").version == 1
        newer = env.add_version("digits", env.publish("digits/v3.onnx", env.model_file(4)))
        env.catalog.set_default_version("digits", newer)  # another replica deployed it
        env.store.gate = threading.Event()
        syncing = asyncio.create_task(registry.sync())
        await asyncio.to_thread(env.store.waiting.wait, BOUND_S)
        assert registry.ready() is False and states(registry, "digits")[newer] == "loading"
        assert registry.get("digits").version == 1  # the old default serves meanwhile
        np.testing.assert_allclose(await logits(registry.get("digits")), expected(env, 0), rtol=1e-5, atol=1e-6)
        with pytest.raises(Unavailable, match="not loaded"):
            registry.get("digits", newer)
        await open_gate(syncing)
        assert registry.ready() is True and registry.get("digits").version == newer
        await registry.close()

    arun(body)


# -- deploy, rollback and hot swap --


def test_deploy_and_rollback_swap_the_default_and_record_it(env: Env) -> None:
    env.upload("digits", (0, 1))
    registry = env.registry()

    async def body() -> None:
        await registry.sync()
        assert registry.get("digits").version == 2
        await registry.deploy("digits", 1)  # rollback
        assert registry.get("digits").version == 1 and env.catalog.get_model("digits").default_version == 1
        np.testing.assert_allclose(await logits(registry.get("digits")), expected(env, 0), rtol=1e-5, atol=1e-6)
        await registry.sync()  # the database agrees: nothing moves
        assert registry.get("digits").version == 1
        await registry.deploy("digits", 2)
        assert registry.get("digits").version == 2 and env.catalog.get_model("digits").default_version == 2
        with pytest.raises(NotFound):
            await registry.deploy("digits", 7)
        with pytest.raises(NotFound):
            await registry.deploy("nope", 1)
        pending = env.add_version("digits", None, state="pending")
        with pytest.raises(NotFound, match="not ready"):
            await registry.deploy("digits", pending)
        broken = env.tmp / "broken.onnx"
        broken.write_bytes(b"garbage")
        bad = env.add_version("digits", env.publish("digits/bad.onnx", broken))
        with pytest.raises(Conflict, match=f"version {bad} of model 'digits' failed to load"):
            await registry.deploy("digits", bad)
        assert registry.get("digits").version == 2 and env.catalog.get_model("digits").default_version == 2
        await registry.close()

    arun(body)


def test_deploy_loads_a_version_not_loaded_yet(env: Env) -> None:
    env.upload("digits", (0, 1))
    registry = env.registry()

    async def body() -> None:
        await registry.sync()
        newer = env.add_version("digits", env.publish("digits/v3.onnx", env.model_file(6)))
        await registry.deploy("digits", newer)  # before any sync saw it
        assert registry.get("digits").version == newer
        np.testing.assert_allclose(await logits(registry.get("digits")), expected(env, 6), rtol=1e-5, atol=1e-6)
        await registry.close()

    arun(body)


def test_requests_in_flight_finish_on_the_old_version_during_a_swap(env: Env) -> None:
    env.upload("digits", (0, 1))
    registry = env.registry()

    async def body() -> None:
        await registry.sync()
        old = registry.get("digits")
        gate = threading.Event()
        gated = GatedSession(old.session, gate)
        old.session = gated
        in_flight = [asyncio.create_task(logits(old, X[i : i + 1])) for i in range(3)]
        await asyncio.to_thread(gated.started.wait, BOUND_S)
        await registry.deploy("digits", 1)
        new = registry.get("digits")
        assert new.version == 1
        np.testing.assert_allclose(await logits(new), expected(env, 0), rtol=1e-5, atol=1e-6)
        assert not any(task.done() for task in in_flight)  # still held by the gate, on version 2
        gate.set()
        answers = await asyncio.gather(*in_flight)
        np.testing.assert_allclose(np.concatenate(answers), expected(env, 1), rtol=1e-5, atol=1e-6)
        assert registry.get("digits", 2) is old  # the old version stays loaded
        await registry.close()

    arun(body)


def test_another_replicas_deploy_is_followed_by_run_forever(env: Env) -> None:
    env.upload("digits", (0, 1))
    registry = env.registry()

    async def body() -> None:
        stop = asyncio.Event()
        follower = asyncio.create_task(registry.run_forever(stop, 0.02))
        await until(registry.ready)
        assert registry.get("digits").version == 2
        env.catalog.set_default_version("digits", 1)
        await until(lambda: registry.get("digits").version == 1)
        stop.set()
        await follower
        await registry.close()

    arun(body)


# -- deletion --


def test_a_deleted_model_unloads_after_draining_its_requests(env: Env) -> None:
    env.upload("gone", (0, 1))
    env.upload("kept", (2, 3))
    registry = env.registry()

    async def body() -> None:
        await registry.sync()
        doomed = registry.get("gone")
        gate = threading.Event()
        gated = GatedSession(doomed.session, gate)
        doomed.session = gated
        in_flight = asyncio.create_task(logits(doomed))
        await asyncio.to_thread(gated.started.wait, BOUND_S)
        env.catalog.delete_model("gone")
        syncing = asyncio.create_task(registry.sync())

        def hidden() -> bool:
            try:
                registry.get("gone")
            except NotFound:
                return True
            return False

        await until(hidden)
        assert not syncing.done()  # unloading waits for the request in flight
        gate.set()
        np.testing.assert_allclose(await in_flight, expected(env, 1), rtol=1e-5, atol=1e-6)
        await syncing
        assert registry.versions("gone") == [] and not doomed.path.exists()
        with pytest.raises(Unavailable):
            await logits(doomed)  # its batcher is closed
        assert ("unloaded", "gone", 1) in env.listener.events and ("unloaded", "gone", 2) in env.listener.events
        assert registry.ready() is True and registry.get("kept").version == 2
        env.upload("gone", (8, 9))  # the same name again: a new model, new files
        await registry.sync()
        np.testing.assert_allclose(await logits(registry.get("gone")), expected(env, 9), rtol=1e-5, atol=1e-6)
        assert registry.models()[0].versions == (VersionStatus(1, "ready"), VersionStatus(2, "ready"))
        await registry.close()

    arun(body)


def test_string_tensors_load_and_serve(env: Env) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = env.tmp / "echo.onnx"
    onnx.save(model, str(path))
    env.upload("echo", (0, 0), deploy=False)
    number = env.add_version("echo", env.publish("echo/v3.onnx", path))
    registry = env.registry()

    async def body() -> None:
        await registry.sync()
        served = registry.get("echo", number)
        assert served.inputs == [TensorSpec(name="text", dtype="str", shape=("batch", 2))]
        rows = [np.array([[f"a{i}", "b"]], dtype=object) for i in range(4)]
        answers = await asyncio.gather(*(served.infer({"text": r}) for r in rows))
        assert [a["echo"].tolist() for a in answers] == [r.tolist() for r in rows]
        await registry.close()

    arun(body)
