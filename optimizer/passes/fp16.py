"""Float16 conversion with ``onnxruntime.transformers.float16.convert_float_to_float16``.

Only offered on a CUDA GPU: ONNX Runtime's CPU provider lacks float16 kernels for most operators
(it would insert casts or fail) and CPUs gain little from it. Inputs and outputs stay float32 by
default (``keep_io_types``), so callers and sample data do not change. The model is loaded in memory
and handed over as a ModelProto: given a path, the converter writes a temporary file beside it.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import onnx

from optimizer.artifact import ModelArtifact
from optimizer.errors import PassFailed, first_line
from optimizer.passes._util import LARGE_MODEL_BYTES
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.passes.registry import register


class Float16Config(PassConfig):
    """``op_block_list=None`` uses ORT's default list of ops kept in float32; ``()`` blocks none."""

    keep_io_types: bool = True
    op_block_list: tuple[str, ...] | None = None


@register
class Float16(Pass[Float16Config]):
    """Convert float32 weights and computation to float16 (CUDA only)."""

    name: ClassVar[str] = "fp16"
    technique: ClassVar[str] = "fp16"
    config_class: ClassVar[type[PassConfig]] = Float16Config

    def skip_reason(self, model: ModelArtifact, context: PassContext) -> str | None:
        """fp16 needs a CUDA device."""
        return None if context.device == "cuda" else "fp16 is only offered on a CUDA GPU"

    def run(self, model: ModelArtifact, context: PassContext) -> ModelArtifact:
        """Write the float16 model; count converted initializers in ``context.details``."""
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        large = model.size_bytes > LARGE_MODEL_BYTES
        block = DEFAULT_OP_BLOCK_LIST if self.config.op_block_list is None else list(self.config.op_block_list)
        output = context.output_path(self.name)
        try:
            proto = onnx.load(str(model.path))
            # In-memory shape inference refuses protos over 2 GiB: large models convert without it.
            converted = convert_float_to_float16(
                proto, keep_io_types=self.config.keep_io_types, op_block_list=block, disable_shape_infer=large
            )
            onnx.save_model(
                converted,
                str(output),
                save_as_external_data=large,
                all_tensors_to_one_file=True,
                location=output.name + ".data",
            )
        except Exception as exc:  # the converter raises ValueError/AssertionError, onnx its own errors
            output.unlink(missing_ok=True)
            raise PassFailed(f"{self.name}: {first_line(exc, model.path.parent, context.work_dir)}") from exc
        kinds = Counter(
            onnx.TensorProto.DataType.Name(init.data_type)
            for init in onnx.load(str(output), load_external_data=False).graph.initializer
        )
        context.details.update(
            keep_io_types=self.config.keep_io_types,
            float16_initializers=kinds.get("FLOAT16", 0),
            float32_initializers=kinds.get("FLOAT", 0),
            op_block_list="default" if self.config.op_block_list is None else sorted(block),
        )
        return ModelArtifact.from_onnx_file(output)
