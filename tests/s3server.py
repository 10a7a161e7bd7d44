"""A real S3 endpoint for tests: moto's server in a child process on a free loopback port.

The child binds port 0 itself (``ThreadedMotoServer``) and prints the port it got, so there is no
race between picking a free port and binding it. It stops when its stdin closes (the test process
died) or when ``stop()`` terminates it.

Usage::

    with s3_server() as s3:                  # s3.endpoint_url == "http://127.0.0.1:<port>"
        s3.create_bucket("artifacts")
        store = open_store("s3://artifacts/x", s3_endpoint_url=s3.endpoint_url)

Credentials: s3fs/botocore need some; ``dummy_aws_env()`` gives dummy values for the test
environment (moto accepts any).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: Variables that point botocore at dummy credentials and a region, away from any real account.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}

_CHILD = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes the pipe or dies
server.stop()
"""


def dummy_aws_env() -> dict[str, str]:
    """The dummy AWS variables (set them in the test environment before opening an S3 store)."""
    return dict(DUMMY_AWS_ENV)


@dataclass
class S3Server:
    """A running moto S3 server child process."""

    process: subprocess.Popen[str]
    endpoint_url: str

    def client(self) -> Any:
        """A boto3 S3 client for this server, with the dummy credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=DUMMY_AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket."""
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        """Terminate the child and wait for it (kill if it does not go)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_s3_server(startup_timeout: float = 60.0) -> S3Server:
    """Start moto's S3 server in a child process and wait until it answers HTTP."""
    env = {**os.environ, **DUMMY_AWS_ENV}
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.isdigit():
        process.kill()
        process.wait()
        raise RuntimeError("moto server did not start")
    server = S3Server(process, f"http://127.0.0.1:{int(line)}")
    deadline = time.monotonic() + startup_timeout
    while True:
        try:
            with urllib.request.urlopen(f"{server.endpoint_url}/moto-api/", timeout=5) as response:
                response.read()
            return server
        except (urllib.error.URLError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("moto server did not answer") from None
            time.sleep(0.05)


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the duration of the ``with`` block."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()
