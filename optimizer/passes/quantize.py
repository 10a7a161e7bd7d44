"""8-bit quantization with ONNX Runtime's quantization tools: dynamic (``int8_dynamic``) and static QDQ
(``int8_static``).

Both passes stage a private copy of the input model in a scratch folder inside ``context.work_dir``
(ORT's loaders write a ``-inferred`` file beside whatever path they are given, so we never hand them
the user's file) and name any unnamed node so it can be excluded by name. The scratch folder is
removed when the pass ends.

Static quantization runs ``quant_pre_process`` first. Calibration is run here with ORT's own
``create_calibrator`` so that its augmented model is written inside the scratch folder (``quantize_static``
would put it in the system temp folder); the ranges are saved with ``save_tensors_data`` and handed to
``quantize_static`` as its ``calibration_cache_path``, which then skips calibrating again. The same cache
lets the accuracy-aware fallback re-quantize with other exclusions without re-calibrating.

Dynamic quantization deliberately skips ``quant_pre_process``: it fuses MatMul+Add into Gemm, which
ORT's dynamic (integer-op) quantizer does not handle.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import onnx
from pydantic import Field, model_validator

from optimizer.artifact import ModelArtifact
from optimizer.data import SampleData
from optimizer.errors import PassFailed, first_line
from optimizer.passes._util import LARGE_MODEL_BYTES, quiet_stdout, scratch_cwd
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.registry import register

Feed = dict[str, np.ndarray]

# ORT's entropy calibrator defaults to 128 histogram bins searched down to 128 quantized bins, which
# leaves one candidate threshold (the full range, i.e. min-max). 512 bins give the KL search real
# choices while keeping ORT's pure-Python search affordable (about 190 thresholds per tensor).
_CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {"entropy": {"num_bins": 512, "num_quantized_bins": 128}}

# Ops whose presence shows a model was really quantized (QDQ, dynamic integer ops, contrib ops).
_QUANT_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
    | {"DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "QEmbedLayerNormalization"}
)


def model_feeds(
    data: SampleData,
    model: ModelArtifact,
    batch_size: int,
    max_samples: int | None = None,
    equal_size: bool = False,
) -> list[Feed]:
    """Session feeds over the first ``max_samples`` samples, ``batch_size`` samples each.

    An input with a fixed first axis (e.g. exported with batch 1) gets feeds of exactly that size. With
    ``equal_size`` (ORT's histogram calibrators stack feeds, so they need equal shapes) every feed has
    the same size too. Where feeds must be full, a short last feed is filled by wrapping round to the
    first samples.
    """
    count = len(data) if max_samples is None else min(len(data), max_samples)
    if count <= 0:
        raise PassFailed("no samples to feed the model")
    names = [spec.name for spec in model.inputs]
    missing = [name for name in names if name not in data.inputs]
    if missing:
        raise PassFailed(f"sample data has no array for model input {missing[0]!r}")
    fixed = {spec.shape[0] for spec in model.inputs if spec.shape and isinstance(spec.shape[0], int)}
    if len(fixed) > 1:
        raise PassFailed(f"model inputs have different fixed batch sizes {sorted(fixed)}")
    size = next(iter(fixed)) if fixed else min(max(1, batch_size), count)
    wrap = bool(fixed) or equal_size
    feeds: list[Feed] = []
    for start in range(0, count, size):
        stop = start + size
        indices = np.arange(start, stop) % count if wrap else np.arange(start, min(stop, count))
        feeds.append({name: data.inputs[name][indices] for name in names})
    return feeds


class FeedReader:
    """An ORT ``CalibrationDataReader`` over prepared feeds: calibrators call ``get_next``,
    ``qdq_loss_debug.collect_activations`` iterates."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = iter(list(feeds))

    def get_next(self) -> Feed | None:
        """The next feed, or None when exhausted."""
        return next(self._feeds, None)

    def __iter__(self) -> Iterator[Feed]:
        return self._feeds


def stage_model(source: Path, target: Path) -> Path:
    """Copy an ONNX model (with its external data) to ``target``, naming unnamed nodes."""
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise PassFailed(f"cannot read the model: {first_line(exc, source.parent, target.parent)}") from exc
    used = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    save_model(model, target)
    return target


def save_model(model: onnx.ModelProto, target: Path) -> None:
    """Save ``model``; large models keep their weights in ``<name>.data`` beside it."""
    try:
        large = model.ByteSize() > LARGE_MODEL_BYTES
    except Exception:  # protobuf may refuse to size a message over 2 GiB
        large = True
    onnx.save_model(
        model, str(target), save_as_external_data=large, all_tensors_to_one_file=True, location=target.name + ".data"
    )


def quantization_summary(path: Path) -> dict[str, Any]:
    """Counts that show a model really is quantized: 8-bit initializers and quantization ops."""
    model = onnx.load(str(path), load_external_data=False)
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    ops = Counter(node.op_type for node in model.graph.node if node.op_type in _QUANT_OPS)
    return {
        "int8_initializers": sum(1 for init in model.graph.initializer if init.data_type in eight_bit),
        "quantization_ops": dict(sorted(ops.items())),
    }


class QuantizationConfig(PassConfig):
    """Options both 8-bit passes share. ``op_types=None`` means ONNX Runtime's default list."""

    per_channel: bool = False
    reduce_range: bool = False
    weight_type: Literal["qint8", "quint8"] = "qint8"
    op_types: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] = ()


QC = TypeVar("QC", bound=QuantizationConfig)


@dataclass
class Prepared:
    """A staged float model ready to quantize, possibly with calibration ranges already computed."""

    model: ModelArtifact
    scratch: Path
    calibration_cache: Path | None = None
    notes: dict[str, Any] = field(default_factory=dict)


class QuantizationPass(Pass[QC]):
    """Shared flow: stage and prepare once, then quantize (possibly several times with exclusions)."""

    @contextmanager
    def prepared(self, model: ModelArtifact, context: PassContext) -> Iterator[Prepared]:
        """Stage and prepare ``model`` in a scratch folder of the work dir, removed afterwards."""
        context.work_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=context.work_dir)).resolve()
        try:
            yield self._prepare(model, context, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def run(self, model: ModelArtifact, context: PassContext) -> ModelArtifact:
        """Quantize ``model`` with this pass's config."""
        with self.prepared(model, context) as prepared:
            context.details.update(prepared.notes)
            return self.quantize(prepared, context)

    def quantize(
        self,
        prepared: Prepared,
        context: PassContext,
        exclude: Sequence[str] = (),
        stem: str | None = None,
    ) -> ModelArtifact:
        """Write a quantized model (``<stem>.onnx`` in the work dir, the pass name by default) that leaves
        ``config.nodes_to_exclude`` and ``exclude`` in float; PassFailed when nothing was quantized."""
        excluded = list(dict.fromkeys([*self.config.nodes_to_exclude, *exclude]))
        output = context.output_path(stem or self.name)
        try:
            self._quantize(prepared, output, excluded)
        except PassFailed:
            raise
        except Exception as exc:  # ORT's quantizer raises ValueError, RuntimeError, onnx errors
            output.unlink(missing_ok=True)
            raise PassFailed(f"{self.name}: {first_line(exc, prepared.scratch, context.work_dir)}") from exc
        summary = quantization_summary(output)
        if summary["int8_initializers"] == 0 and not summary["quantization_ops"]:
            output.unlink(missing_ok=True)
            raise PassFailed(f"{self.name}: no operator in the model could be quantized")
        context.details.update(summary)
        context.details["nodes_excluded"] = excluded
        graph = onnx.load(str(prepared.model.path), load_external_data=False).graph
        unknown = sorted(set(excluded) - {node.name for node in graph.node})
        if unknown:  # e.g. renamed by pre-processing's fusions (fc1 -> fc1/MatMulAddFusion)
            context.details["nodes_not_found"] = unknown
        return ModelArtifact.from_onnx_file(output)

    def quantized_op_types(self) -> list[str] | None:
        """The op types this pass asks ORT to quantize (None: ORT's default for the mode)."""
        return list(self.config.op_types) if self.config.op_types else None

    def _large(self, prepared: Prepared) -> bool:
        return prepared.model.size_bytes > LARGE_MODEL_BYTES

    def _prepare(self, model: ModelArtifact, context: PassContext, scratch: Path) -> Prepared:
        staged = stage_model(model.path, scratch / "float.onnx")
        return Prepared(ModelArtifact.from_onnx_file(staged), scratch)

    def _quantize(self, prepared: Prepared, output: Path, exclude: list[str]) -> None:
        raise NotImplementedError


class DynamicQuantizationConfig(QuantizationConfig):
    """``quantize_dynamic`` options: weights to 8 bits offline, activations quantized at run time."""


@register
class DynamicQuantization(QuantizationPass[DynamicQuantizationConfig]):
    """Dynamic int8 quantization (``onnxruntime.quantization.quantize_dynamic``)."""

    name: ClassVar[str] = "int8_dynamic"
    technique: ClassVar[str] = "int8-dynamic"
    config_class: ClassVar[type[PassConfig]] = DynamicQuantizationConfig

    def _prepare(self, model: ModelArtifact, context: PassContext, scratch: Path) -> Prepared:
        from onnxruntime.quantization import quant_pre_process

        prepared = super()._prepare(model, context, scratch)
        prepared.notes.update(weight_type=self.config.weight_type, per_channel=self.config.per_channel)
        # Shape inference only (no optimization: that would merge MatMul+Add into Gemm, which the
        # dynamic quantizer leaves alone). Fused transformer ops (Attention, BiasGelu...) carry no
        # output types otherwise, and quantize_dynamic refuses MatMuls reading from them.
        inferred = scratch / "inferred.onnx"
        try:
            with scratch_cwd(scratch):
                quant_pre_process(
                    str(prepared.model.path),
                    str(inferred),
                    skip_optimization=True,
                    save_as_external_data=model.size_bytes > LARGE_MODEL_BYTES,
                )
        except Exception as exc:  # symbolic shape inference gives up on some graphs; quantize as is
            prepared.notes["shape_inference_note"] = f"shape inference failed ({first_line(exc, scratch)})"
            return prepared
        prepared.model = ModelArtifact.from_onnx_file(inferred)
        return prepared

    def _quantize(self, prepared: Prepared, output: Path, exclude: list[str]) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            prepared.model.path,
            output,
            op_types_to_quantize=list(self.config.op_types) if self.config.op_types else None,
            per_channel=self.config.per_channel,
            reduce_range=self.config.reduce_range,
            weight_type=QuantType.QInt8 if self.config.weight_type == "qint8" else QuantType.QUInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=self._large(prepared),
        )


class StaticQuantizationConfig(QuantizationConfig):
    """``quantize_static`` options (QDQ format) and how calibration feeds are formed."""

    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    activation_type: Literal["quint8", "qint8"] = "quint8"
    max_calibration_samples: int = Field(default=256, ge=1)
    calibration_batch_size: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _check_types(self) -> StaticQuantizationConfig:
        if self.activation_type == "qint8" and self.weight_type == "quint8":
            raise ValueError("ONNX Runtime does not support qint8 activations with quint8 weights")
        return self


@register
class StaticQuantization(QuantizationPass[StaticQuantizationConfig]):
    """Static int8 QDQ quantization, calibrated on ``context.calibration``."""

    name: ClassVar[str] = "int8_static"
    technique: ClassVar[str] = "int8-static"
    config_class: ClassVar[type[PassConfig]] = StaticQuantizationConfig

    def _prepare(self, model: ModelArtifact, context: PassContext, scratch: Path) -> Prepared:
        from onnxruntime.quantization import quant_pre_process

        notes: dict[str, Any] = {"calibration": self.config.calibration}
        raw = stage_model(model.path, scratch / "raw.onnx")
        preprocessed = scratch / "float.onnx"
        failure: str | None = None
        # Symbolic shape inference helps transformers but gives up on some graphs: retry without it.
        for skip_symbolic in (False, True):
            try:
                with scratch_cwd(scratch):
                    quant_pre_process(
                        str(raw),
                        str(preprocessed),
                        skip_symbolic_shape=skip_symbolic,
                        save_as_external_data=model.size_bytes > LARGE_MODEL_BYTES,
                    )
                stage_model(preprocessed, preprocessed)  # name nodes the optimizer left unnamed
                failure = None
                break
            except Exception as exc:  # symbolic shape inference or ORT's optimizer failed
                failure = first_line(exc, scratch, context.work_dir)
        notes["preprocessed"] = failure is None
        if failure is not None:
            context.log(f"{self.name}: pre-processing failed, quantizing the raw model")
            notes["preprocess_note"] = f"pre-processing failed ({failure}); quantized the raw model"
            preprocessed = raw
        float_model = ModelArtifact.from_onnx_file(preprocessed)
        feeds = model_feeds(
            context.calibration,
            float_model,
            self.config.calibration_batch_size,
            self.config.max_calibration_samples,
            equal_size=True,
        )
        cache = scratch / "calibration.json"
        try:
            self._calibrate(preprocessed, feeds, scratch / "augmented.onnx", cache)
        except Exception as exc:
            reason = first_line(exc, scratch, context.work_dir)
            raise PassFailed(f"{self.name}: calibration failed: {reason}") from exc
        notes["calibration_samples"] = min(len(context.calibration), self.config.max_calibration_samples)
        notes["calibration_batches"] = len(feeds)
        return Prepared(float_model, scratch, cache, notes)

    def quantized_op_types(self) -> list[str]:
        """The op types handed to ``quantize_static`` (its own default list when none are configured)."""
        if self.config.op_types:
            return list(self.config.op_types)
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # quantize_static's own default

    def _calibrate(self, model_path: Path, feeds: list[Feed], augmented: Path, cache: Path) -> None:
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        calibrator = create_calibrator(
            model_path,
            self.quantized_op_types(),
            augmented_model_path=str(augmented),
            calibrate_method=_calibration_method(self.config.calibration),
            use_external_data_format=model_path.stat().st_size > LARGE_MODEL_BYTES,
            extra_options=_CALIBRATOR_OPTIONS.get(self.config.calibration, {}),
        )
        try:
            # ORT's histogram calibrators print progress; keep stdout clean for callers that speak over it.
            with quiet_stdout():
                calibrator.collect_data(FeedReader(feeds))
                save_tensors_data(calibrator.compute_data(), cache)
        finally:
            del calibrator
            augmented.unlink(missing_ok=True)
            augmented.with_name(augmented.name + ".data").unlink(missing_ok=True)

    def _quantize(self, prepared: Prepared, output: Path, exclude: list[str]) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        types = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
        quantize_static(
            prepared.model.path,
            output,
            calibration_data_reader=None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=self.quantized_op_types(),
            per_channel=self.config.per_channel,
            reduce_range=self.config.reduce_range,
            activation_type=types[self.config.activation_type],
            weight_type=types[self.config.weight_type],
            nodes_to_exclude=exclude,
            use_external_data_format=self._large(prepared),
            calibrate_method=_calibration_method(self.config.calibration),
            calibration_cache_path=prepared.calibration_cache,
        )


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]
