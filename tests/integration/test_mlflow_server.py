"""tracking/ against a real `mlflow server` on loopback: the registry promotion flow over HTTP, with the server
found through MLFLOW_TRACKING_URI as a user would set it; two registrations at once; the register stage with a
password in that URI."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from action3d.project import tracking_uri
from tests.helpers import RACE_ROUNDS, log_trained_runs, mlflow_server, promotion_flow, race

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root) as url:
        yield url, root


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """Five runs with their logged models, made over HTTP: what the registry tests register."""
    url, _ = server
    try:
        return log_trained_runs(url, "server-registry", tmp_path_factory.mktemp("checkpoints"))
    finally:
        mlflow.set_tracking_uri(None)


def test_registry_promotion_against_a_server(server, trained, tmp_path, monkeypatch):
    url, root = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == url
    try:
        promotion_flow(url, "action3d-server", trained)
    finally:
        mlflow.set_tracking_uri(None)
    assert not (tmp_path / "mlflow.db").exists()
    experiment = MlflowClient(url).get_experiment_by_name("server-registry")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server stores the artifacts
    assert any((root / "artifacts").rglob("MLmodel"))


def test_the_registry_commands_against_a_server(server, trained, tmp_path, monkeypatch, capsys):
    """`action3d registry list|promote|show|lineage` over HTTP."""
    from action3d.cli import main
    from action3d.tracking.registry import register_model

    url, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(url)
    name = "action3d-server-cli"
    try:
        for (run_id, _, _), score in zip(trained, (0.5, 0.7)):
            register_model(run_id, name, metrics={"video_top1": score}, data_digest="split-a",
                           metric_key="video_top1", tracking_uri=url)
    finally:
        mlflow.set_tracking_uri(None)  # which also clears MLFLOW_TRACKING_URI: set it again, as a user has it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)

    def cli(*args: str) -> str:
        code = main(["registry", *args, "--name", name])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    listed = json.loads(cli("list", "--json"))
    champion = client.get_model_version_by_alias(name, "champion")
    assert [r["version"] for r in listed] == sorted((r["version"] for r in listed), key=int, reverse=True)
    assert next(r for r in listed if "champion" in r["aliases"])["version"] == champion.version
    assert "was v" in cli("promote", "1", "--alias", "champion", "--reason", "roll back over HTTP")
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert json.loads(cli("show", "champion"))["promoted"] == "roll back over HTTP"
    lineage = json.loads(cli("lineage", f"{name}@champion"))
    assert lineage["runs"][0]["run_id"] == client.get_model_version(name, "1").run_id


def test_two_registrations_at_once_against_a_server(server, trained, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    try:
        race(url, [run_id for run_id, _, _ in trained], "server-race", tmp_path, RACE_ROUNDS)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_register_stage_records_no_credential_of_the_tracking_uri(server, trained, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI with a user and password (requests sends them as basic auth; this server ignores it):
    the register stage talks to the server through it, and no file it writes holds the password."""
    from action3d.config import load_params
    from action3d.report import terminal_summary
    from action3d.stages import STAGES

    url, _ = server
    with_password = url.replace("http://", "http://user:secret@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_password)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    try:
        run_id = trained[0][0]
        # what the finetune and evaluate stages leave for register (by hand: this test is about the writer)
        (tmp_path / "runs/finetune").mkdir(parents=True)
        (tmp_path / "runs/finetune/run.json").write_text(json.dumps({"run_id": run_id}))
        for which in ("finetune", "scratch"):
            (tmp_path / f"runs/evaluate/{which}").mkdir(parents=True)
            (tmp_path / f"runs/evaluate/{which}/metrics.json").write_text(json.dumps(
                {"video_top1": 0.5, "video_top5": 1.0, "clip_top1": 0.4, "videos": 3, "chance": 0.25}))
        side = {"video_top1": 0.5, "video_top1_low": 0.2, "video_top1_high": 0.8}
        (tmp_path / "runs/metrics.json").write_text(json.dumps({
            "chance": 0.25, "test_videos": 3, "finetune": side, "scratch": side, "transfer_gain": 0.0,
            "transfer_gain_low": -0.2, "transfer_gain_high": 0.2, "transfer_gain_p": 1.0}))
        (tmp_path / "data/splits/finetune").mkdir(parents=True)
        (tmp_path / "data/splits/finetune/test.csv").write_text("path,label\nv/a.mp4,0\n")
        params = load_params(Path(__file__).parents[2] / "params.yaml", ["registry.model_name=credentials"])
        record = STAGES["register"].run(
            params, train="runs/finetune", metrics="runs/evaluate/finetune/metrics.json",
            manifests="data/splits/finetune", cache="data/cache/finetune", out="runs/register/registration.json",
        )  # fmt: skip
        shown = terminal_summary(Path("runs"))  # while MLFLOW_TRACKING_URI still names the server
    finally:
        mlflow.set_tracking_uri(None)
    assert record["alias"] == "champion" and record["tracking_uri"] == url.replace("http://", "http://user:***@")
    assert MlflowClient(url).get_model_version_by_alias("credentials", "champion").run_id == run_id
    written = json.loads((tmp_path / "runs/register/registration.json").read_text())
    assert written["tracking_uri"] == record["tracking_uri"]
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and b"secret" in p.read_bytes()]
    assert leaks == []
    assert "secret" not in shown and f"open {record['tracking_uri']}" in shown
