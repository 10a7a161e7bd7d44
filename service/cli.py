"""The ``slimserve`` command: ``serve``, ``worker``, ``optimize`` and the client commands.

``optimize`` is the offline optimizer (``optimizer.cli``), handed its arguments unchanged.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from service.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    """``slimserve serve|worker|optimize|submit|jobs|models``."""
    from service import client_cli

    parser = argparse.ArgumentParser(prog="slimserve", description="Optimize and serve ML models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service (and, by default, one worker)")
    serve.add_argument("--host", help="bind address (default SLIMSERVE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default SLIMSERVE_PORT or 8000)")
    serve.add_argument("--no-worker", action="store_true", help="do not run the in-process worker")
    worker = commands.add_parser("worker", help="run a standalone optimization worker")
    worker.add_argument("--metrics-port", type=int, help="serve this worker's Prometheus metrics on this port")
    worker.add_argument("--metrics-host", default="127.0.0.1", help="bind address of the metrics port")
    commands.add_parser(
        "optimize", help="optimize a model file offline (see: slimserve optimize --help)", add_help=False
    )
    client_cli.add_commands(commands)
    return parser


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> int:
    """Run uvicorn on the app until SIGTERM/SIGINT (uvicorn drains in-flight requests first)."""
    import uvicorn

    from service.app import create_app
    from service.http.protocol import protocol_class
    from service.http.server import DrainingServer

    if not settings.auth_enabled and not is_loopback(settings.host):
        print(
            f"error: refusing to bind {settings.host} without an API key; set SLIMSERVE_ADMIN_KEYS "
            "(and SLIMSERVE_INFER_KEYS) or bind 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    app = create_app(settings)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handler it found at
    # start; a no-op handler there makes a clean shutdown exit 0 instead of dying of the signal.
    signal.signal(signal.SIGTERM, _ignore_signal)
    signal.signal(signal.SIGINT, _ignore_signal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,
        timeout_keep_alive=math.ceil(settings.keep_alive_seconds),
        # request heads (and bodies left over after an answer) get a deadline: slow clients are cut off
        http=protocol_class(head_timeout=settings.upload_idle_seconds),
        server_header=False,
    )
    # Everything built so far lives as long as the process: keep it out of the cyclic collector's
    # full passes (they paused the server for 100-200 ms under load in the serving benchmark).
    gc.collect()
    gc.freeze()
    on_drain = app.state.on_drain
    DrainingServer(config, on_drain=on_drain, drain_seconds=settings.drain_seconds).run()
    return 0


def _ignore_signal(_signum: int, _frame: Any) -> None:
    return None


def run_worker(settings: Settings, metrics_port: int | None, metrics_host: str) -> int:
    """Claim and run jobs until SIGTERM/SIGINT; a job in flight is handed back to the queue."""
    from prometheus_client import start_http_server

    from service.app import build_services
    from service.metrics import NvmlCollector

    services = build_services(settings, queue_gauges=False)
    NvmlCollector.register_if_available(services.registry)  # a GPU worker's memory and utilization
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host, registry=services.registry)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        services.worker().run_forever(stop)
    finally:
        services.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimserve`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["optimize"]:
        from optimizer.cli import main as optimize_main

        return optimize_main(argv)
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "worker"):
        overrides: dict[str, Any] = {}
        if args.command == "serve":
            overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
            if args.no_worker:
                overrides["run_worker"] = False
        settings = Settings(**overrides)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.command == "serve":
            return serve(settings)
        return run_worker(settings, args.metrics_port, args.metrics_host)
    from service import client_cli

    return client_cli.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
