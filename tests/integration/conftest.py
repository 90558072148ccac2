"""Real servers on loopback for the integration tests: moto (S3 over HTTP) and an MLflow server on it.

Reuse in any test under tests/integration:

- ``s3_server`` (session): a running ``moto_server``; ``.endpoint_url``, ``.env`` (the AWS variables that
  point a client at it), ``.client()`` (a boto3 S3 client).
- ``s3_env`` (function): sets those AWS variables in ``os.environ`` for one test (and hides ~/.aws), so
  anything the test runs, subprocesses included, talks to moto; returns ``s3_server``.
- ``s3_bucket`` (function): a fresh, empty bucket name on it (implies ``s3_env``).
- ``mlflow_s3_server`` (session): an ``mlflow server`` on a sqlite store whose artifacts go to
  ``s3://<bucket>/mlflow`` on moto; ``.tracking_uri``, ``.bucket``, ``.artifact_prefix``.
- ``start_server`` (fixture returning ``serve``): ``with start_server(argv, port=..., health_path=...):``
  runs any server command in its own process group, waits until it answers HTTP on 127.0.0.1, and stops it
  (the whole group) afterwards. ``start_moto`` (fixture returning ``moto``): a moto server of one's own.
- ``free_port`` (fixture returning the function), ``venv_bin`` (the venv's bin folder: moto_server, mlflow, dvc).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


BIN = Path(sys.executable).parent  # the venv's scripts sit beside its python
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(argv: Sequence[str], *, port: int, health_path: str = "/", env: Mapping[str, str] | None = None,
          log_path: Path | None = None, timeout: float = 90.0) -> Iterator[subprocess.Popen]:
    """Run a server command until the block ends; ready once ``GET http://127.0.0.1:<port><health_path>`` answers.

    ``env`` adds to (and overrides) this process's environment. Output goes to ``log_path`` (default: discarded),
    whose tail is shown when the server dies or does not answer within ``timeout`` seconds.
    """
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # own process group: workers it forks stop with it

    def tail() -> str:
        return log_path.read_text(errors="replace")[-3000:] if log_path else "(no log kept)"

    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {process.returncode} before answering:\n{tail()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{health_path}", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers, even if not with 200
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{argv[0]} did not answer on port {port} within {timeout:.0f} s:\n{tail()}")
                time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if log_path:
            log.close()


@dataclass(frozen=True)
class MotoServer:
    """A moto server: its URL and the AWS variables that send boto3, DVC and MLflow to it."""

    endpoint_url: str
    port: int

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint_url, **CREDENTIALS}

    def client(self, **credentials: str):
        """A boto3 S3 client on this server; ``credentials`` override the test ones (aws_access_key_id=...)."""
        import boto3

        keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", **credentials}
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1", **keys)


@contextmanager
def moto(log_path: Path, env: Mapping[str, str] | None = None) -> Iterator[MotoServer]:
    """A moto server of its own (for tests that change its global state, e.g. authentication)."""
    port = free_port()
    argv = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serve(argv, port=port, health_path="/moto-api/config", env=env, log_path=log_path):
        yield MotoServer(f"http://127.0.0.1:{port}", port)


@pytest.fixture(scope="session")
def start_server():
    return serve


@pytest.fixture(scope="session")
def start_moto():
    return moto


@pytest.fixture(name="free_port", scope="session")
def free_port_fixture():
    return free_port


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    return BIN


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[MotoServer]:
    with moto(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path) -> MotoServer:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    # Keep the developer's ~/.aws out of the test.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server


@pytest.fixture
def s3_bucket(s3_env) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


@dataclass(frozen=True)
class MlflowServer:
    tracking_uri: str
    bucket: str
    artifact_prefix: str  # key prefix in the bucket under which the server stores artifacts


@pytest.fixture(scope="session")
def mlflow_s3_server(s3_server, tmp_path_factory) -> Iterator[MlflowServer]:
    from action3d.storage import S3Config, mlflow_env

    root = tmp_path_factory.mktemp("mlflow")
    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    s3 = S3Config.from_env(s3_server.env)
    port = free_port()
    argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    with serve(argv, port=port, health_path="/health", env={**mlflow_env(s3), "MLFLOW_DISABLE_TELEMETRY": "true"}, log_path=root / "server.log",
               timeout=120):
        yield MlflowServer(f"http://127.0.0.1:{port}", bucket, "mlflow")
