"""LitServe serving one ONNX model, for the serving benchmark's overhead comparison.

    python bench/litserve_app.py MODEL.onnx --port 8001 [--max-batch-size 32] [--batch-timeout 0.002]

One inference worker (``workers_per_device=1``, CPU) whose ``predict`` runs an ONNX Runtime session
built by :func:`optimizer.runtime.create_session` (the same factory slimserve uses), LitServe's
dynamic batching (``max_batch_size``, ``batch_timeout`` on the ``LitAPI``), and every other LitServe
setting at its default (one API server process, its default queue). It accepts the same KServe v2
JSON body the load generator sends slimserve (``{"inputs": [{"name", "datatype", "shape", "data"}]}``,
one sample per request) and answers in the same shape, so both servers parse and write the same
JSON; only the framework differs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # LitServe's worker re-imports this module in a spawned process
    sys.path.insert(0, str(ROOT))

import litserve as ls  # noqa: E402
import numpy as np  # noqa: E402


class OnnxApi(ls.LitAPI):
    """KServe-v2-shaped JSON in and out, one ORT session, batches concatenated along axis 0."""

    def setup(self, device: str) -> None:
        """Load the session (the model path comes through the environment: the worker is a new process)."""
        from optimizer.runtime import RuntimeOptions, create_session

        threads = int(os.environ.get("BENCH_ORT_THREADS", "0"))
        self.session = create_session(
            Path(os.environ["BENCH_MODEL"]), RuntimeOptions(device="cpu", intra_op_threads=threads)
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    # ``request`` and the response stay unannotated on purpose: LitServe reads these annotations to pick the
    # endpoint's request type (default: the parsed JSON body) and a FastAPI response model (default: none).
    def decode_request(self, request, **kwargs: Any) -> np.ndarray:
        """The first input as a float32 array of its declared shape."""
        tensor = request["inputs"][0]
        return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Stack the requests' arrays (one sample each) into one batch."""
        return np.concatenate(inputs, axis=0)

    def predict(self, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        """One ONNX Runtime run."""
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0])

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        """One row per request (each request carries one sample)."""
        return [output[i : i + 1] for i in range(len(output))]

    def encode_response(self, output: np.ndarray, **kwargs: Any):
        """KServe v2 JSON outputs."""
        return {
            "outputs": [
                {
                    "name": self.output_name,
                    "datatype": "FP32",
                    "shape": list(output.shape),
                    "data": output.ravel().tolist(),
                }
            ]
        }


def main(argv: list[str] | None = None) -> None:
    """Parse the options and run LitServe until killed."""
    parser = argparse.ArgumentParser(description="LitServe on one ONNX model (benchmark baseline).")
    parser.add_argument("model", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.002)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = parser.parse_args(argv)
    os.environ["BENCH_MODEL"] = str(args.model.resolve())
    os.environ["BENCH_ORT_THREADS"] = str(args.threads)
    api = OnnxApi(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
