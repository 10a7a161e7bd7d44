"""`slimserve submit | jobs | models`: the HTTP client on the command line.

Exit codes: 0 success; 2 bad input (a missing file, bad JSON, or the server's 4xx answer);
1 the job failed or was cancelled, the server could not be reached or answered 5xx.
Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.client import ApiError, ClientError, SlimserveClient

#: What `submit --wait` downloads from the optimized version.
RESULT_FILES = ("model.onnx", "report.json", "report.html")
COMMANDS = ("submit", "jobs", "models")


class _InputError(Exception):
    """Bad local input (exit code 2)."""


def add_commands(subparsers: Any) -> None:
    """Register ``submit``, ``jobs`` and ``models`` on an ``argparse`` subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("SLIMSERVE_URL", "http://127.0.0.1:8000"),
        help="server URL (default: $SLIMSERVE_URL or http://127.0.0.1:8000)",
    )
    common.add_argument(
        "--key", default=os.environ.get("SLIMSERVE_API_KEY"), help="API key (default: $SLIMSERVE_API_KEY)"
    )

    submit = subparsers.add_parser("submit", parents=[common], help="upload a model to a slimserve server")
    submit.add_argument("model", type=Path, help="model file (ONNX, TorchScript .pt or torch.export .pt2)")
    submit.add_argument("--data", type=Path, required=True, help="sample data .npz (one array per input)")
    submit.add_argument("--name", required=True, help="model name on the server")
    submit.add_argument("--config", help='job options as a JSON object, e.g. \'{"objective": "latency"}\'')
    submit.add_argument("--max-accuracy-drop", type=float, help="allowed accuracy drop (overrides --config)")
    submit.add_argument("--wait", action="store_true", help="follow the job, then download its results")
    submit.add_argument("--out", type=Path, help="where --wait puts the results (default: ./<name>)")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    submit.add_argument("--poll", type=float, default=1.0, help="with --wait: seconds between status checks")
    submit.set_defaults(client_command="submit")

    jobs = subparsers.add_parser("jobs", parents=[common], help="show a job of a slimserve server")
    jobs.add_argument("job_id", metavar="ID", help="job id (from submit)")
    jobs.set_defaults(client_command="jobs")

    models = subparsers.add_parser("models", parents=[common], help="list models of a slimserve server, or show one")
    models.add_argument("name", nargs="?", metavar="NAME", help="one model's details")
    models.set_defaults(client_command="models")


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``submit``/``jobs``/``models`` command; returns the exit code."""
    out = Console() if Console().is_terminal else Console(width=150)
    err = Console(stderr=True)
    command = getattr(args, "client_command", None) or getattr(args, "command", None)
    handlers = {"submit": _submit, "jobs": _jobs, "models": _models}
    if command not in handlers:
        err.print(f"error: unknown command {command!r}", markup=False, highlight=False)
        return 2
    try:
        with SlimserveClient(args.server, args.key) as client:
            return handlers[command](client, args, out, err)
    except _InputError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except ApiError as exc:
        err.print(f"error: server said {exc.status}: {exc.message}", markup=False, highlight=False, soft_wrap=True)
        return 2 if 400 <= exc.status < 500 else 1
    except ClientError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return 130


def job_config(args: argparse.Namespace) -> dict[str, Any]:
    """The upload's ``config`` from ``--config`` JSON, ``--name`` and ``--max-accuracy-drop``."""
    config: Any = {}
    if args.config:
        try:
            config = json.loads(args.config)
        except ValueError:
            raise _InputError("--config must be a JSON object") from None
        if not isinstance(config, dict):
            raise _InputError("--config must be a JSON object")
    config["name"] = args.name
    if args.max_accuracy_drop is not None:
        config["max_accuracy_drop"] = args.max_accuracy_drop
    return config


def _submit(client: SlimserveClient, args: argparse.Namespace, out: Console, err: Console) -> int:
    for label, path in (("model", args.model), ("--data", args.data)):
        if not path.is_file():
            raise _InputError(f"{label}: no such file: {path}")
    answer = client.upload(args.model, args.data, job_config(args))
    job = answer["job"]
    name = answer.get("model", {}).get("name", args.name)
    out.print(f"submitted {name}: job {job['id']} ({job['status']})", markup=False, highlight=False)
    if not args.wait:
        return 0
    job = _follow(client, job["id"], args, err)
    if job["status"] != "succeeded":
        reason = job.get("error") or job["status"]
        err.print(f"error: job {job['status']}: {reason}", markup=False, highlight=False, soft_wrap=True)
        return 1
    version = int(job["version"])
    folder = args.out if args.out is not None else Path(name)
    paths = [client.download(name, version, filename, folder / filename) for filename in RESULT_FILES]
    _print_summary(out, client.model(name), version)
    for path in paths:
        out.print(f"wrote {path}", markup=False, highlight=False)
    return 0


def _follow(client: SlimserveClient, job_id: str, args: argparse.Namespace, err: Console) -> dict:
    """Wait for the job with a progress bar of its stage and fraction (on stderr)."""
    columns = (TextColumn("{task.description:<40}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("queued", total=1.0)

        def show(job: dict) -> None:
            stage = job.get("stage") or ""
            label = job["status"] if job["status"] != "running" or not stage else stage
            bar.update(task, description=label, completed=float(job.get("progress") or 0.0))

        return client.wait(job_id, timeout=args.timeout, poll=args.poll, on_progress=show)


def _print_summary(out: Console, model: dict, number: int) -> None:
    version = next((v for v in model.get("versions", []) if v.get("number") == number), None)
    summary = (version or {}).get("summary") or {}
    table = Table(title=f"{model.get('name')} version {number}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(str(key), _fmt(value))
    if summary:
        out.print(table)


def _jobs(client: SlimserveClient, args: argparse.Namespace, out: Console, err: Console) -> int:
    out.print_json(data=client.job(args.job_id))
    return 0


def _models(client: SlimserveClient, args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.name:
        out.print_json(data=client.model(args.name))
        return 0
    table = Table(title="models")
    for column in ("name", "versions", "default", "latest job", "stage", "progress"):
        table.add_column(column)
    for model in client.models():
        job = model.get("latest_job") or {}
        table.add_row(
            str(model.get("name")),
            ", ".join(f"{v['number']}:{v['kind']}/{v['state']}" for v in model.get("versions", [])),
            _fmt(model.get("default_version")),
            _fmt(job.get("status")),
            _fmt(job.get("stage")),
            _fmt(job.get("progress")),
        )
    out.print(table)
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)
