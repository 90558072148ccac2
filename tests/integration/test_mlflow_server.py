"""tracking.py against a real `mlflow server` on loopback: the registry promotion flow over HTTP, with the server
found through MLFLOW_TRACKING_URI as a user would set it."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from action3d import tracking

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_tracking import promotion_flow  # noqa: E402  (the same flow as against sqlite)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, start_server, free_port, venv_bin):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    argv = [str(venv_bin / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]  # fmt: skip
    with start_server(argv, port=port, health_path="/health", log_path=root / "server.log", timeout=120):
        yield f"http://127.0.0.1:{port}", root


def test_registry_promotion_against_a_server(mlflow_server, tmp_path, monkeypatch):
    url, root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    uri = tracking.resolve_tracking_uri(tmp_path / "unused.db")
    assert uri == url
    try:
        promotion_flow(uri, "action3d-server", "server-registry")
    finally:
        mlflow.set_tracking_uri(None)
    assert not (tmp_path / "unused.db").exists()
    experiment = MlflowClient(url).get_experiment_by_name("server-registry")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server stores the artifacts
    assert any((root / "artifacts").rglob("MLmodel"))
