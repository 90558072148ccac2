"""tracking.py against a real `mlflow server` on loopback: the registry promotion flow over HTTP, with the server
found through MLFLOW_TRACKING_URI as a user would set it; two registrations at once; the register stage with a
password in that URI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from action3d import tracking

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_tracking import RACE_ROUNDS, log_trained_run, promotion_flow, race  # noqa: E402  (as against sqlite)

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


def test_the_registry_commands_against_a_server(mlflow_server, tmp_path):
    """`action3d registry list|promote|show|lineage` over HTTP, on the versions the promotion test registered."""
    import os
    import subprocess

    url, _ = mlflow_server
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true"}
    client = MlflowClient(url)
    name = "action3d-server-cli"
    if not client.search_model_versions(f"name = '{name}'"):
        try:
            promotion_flow(url, name, "server-cli")
        finally:
            mlflow.set_tracking_uri(None)

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "action3d.cli", "registry", *args, "--name", name], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    listed = json.loads(cli("list", "--json"))
    champion = client.get_model_version_by_alias(name, "champion")
    assert [r["version"] for r in listed] == sorted((r["version"] for r in listed), key=int, reverse=True)
    assert next(r for r in listed if "champion" in r["aliases"])["version"] == champion.version
    assert "was v" in cli("promote", "1", "--alias", "champion", "--reason", "roll back over HTTP")
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert json.loads(cli("show", "champion"))["promoted"] == "roll back over HTTP"
    lineage = json.loads(cli("lineage", f"{name}@champion"))
    assert lineage["runs"][0]["run_id"] == client.get_model_version(name, "1").run_id


def test_two_registrations_at_once_against_a_server(mlflow_server, tmp_path, monkeypatch):
    url, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    try:
        race(url, "server-race", "server-race", tmp_path, RACE_ROUNDS)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_register_stage_records_no_credential_of_the_tracking_uri(mlflow_server, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI with a user and password (requests sends them as basic auth; this server ignores it):
    the register stage talks to the server through it, and no file it writes holds the password."""
    from action3d.config import load_params
    from action3d.report import report
    from action3d.stages import register

    url, _ = mlflow_server
    with_password = url.replace("http://", "http://user:secret@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_password)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    try:
        run_id, _ = log_trained_run(with_password, "credentials", 0)
        # what the finetune and evaluate stages leave for register (by hand: this test is about the writer)
        (tmp_path / "runs/finetune").mkdir(parents=True)
        (tmp_path / "runs/finetune/run.json").write_text(json.dumps({"run_id": run_id}))
        (tmp_path / "runs/evaluate/finetune").mkdir(parents=True)
        (tmp_path / "runs/evaluate/finetune/metrics.json").write_text(json.dumps(
            {"video_top1": 0.5, "video_top5": 1.0, "clip_top1": 0.4, "videos": 3, "chance": 0.25}))
        (tmp_path / "data/splits/finetune").mkdir(parents=True)
        (tmp_path / "data/splits/finetune/test.csv").write_text("path,label\nv/a.mp4,0\n")
        params = load_params(Path(__file__).parents[2] / "params.yaml", ["registry.model_name=credentials"])
        record = register.run(
            params, train_dir="runs/finetune", metrics_path="runs/evaluate/finetune/metrics.json",
            test_manifest="data/splits/finetune/test.csv", cache_dir="data/cache/finetune",
            out_path="runs/register/registration.json",
        )  # fmt: skip
        shown = report(Path("runs"))  # while MLFLOW_TRACKING_URI still names the server
    finally:
        mlflow.set_tracking_uri(None)
    assert record["alias"] == "champion" and record["tracking_uri"] == url.replace("http://", "http://user:***@")
    assert MlflowClient(url).get_model_version_by_alias("credentials", "champion").run_id == run_id
    written = json.loads((tmp_path / "runs/register/registration.json").read_text())
    assert written["tracking_uri"] == record["tracking_uri"]
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and b"secret" in p.read_bytes()]
    assert leaks == []
    assert "secret" not in shown and f"open {record['tracking_uri']}" in shown
