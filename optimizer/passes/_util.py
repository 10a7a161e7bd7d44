"""Small helpers the passes share: output size policy, a scratch working directory, quiet tool output."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_log = logging.getLogger("optimizer.passes")

# Models above this size are written with external data (protobuf's hard limit is 2 GiB).
LARGE_MODEL_BYTES = 1_500_000_000

_CWD_LOCK = threading.Lock()


@contextmanager
def scratch_cwd(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the current directory.

    ORT's symbolic shape inference (used by ``quant_pre_process`` and the transformer fusions) saves
    ``sym_shape_infer_temp.onnx`` and its external data into the current directory when it gives up;
    this keeps that litter in our scratch folder. The directory is process-wide state, hence the lock;
    passes run one at a time in the optimizer's process.
    """
    with _CWD_LOCK:
        previous = os.getcwd()
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(previous)


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Capture what ONNX Runtime's tools print (calibration progress) and log it at debug level."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                _log.debug("%s", line)
