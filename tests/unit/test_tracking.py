"""tracking/ against a real MLflow sqlite store: runs, lineage tags, datasets, the one logged model, registry
aliases, re-scoring, concurrent registrations; and what a recorded store address may hold."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from action3d.config import flatten
from action3d.project import shareable_uri, tracking_uri
from action3d.tracking import models, registry, runs
from action3d.tracking.registry import CHALLENGER, CHAMPION, register_model
from action3d.tracking.runs import start_stage_run
from tests.helpers import CARD, RACE_ROUNDS, checkpoint, log_trained_runs, promotion_flow, race

pytestmark = pytest.mark.slow  # each logged model scores a generated video: seconds per run

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds); tests use their own names in it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        root = tmp_path_factory.mktemp("store")
        yield f"sqlite:///{root / 'mlflow.db'}", root


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> list[tuple[str, Path, nn.Module]]:
    """Five finetune-like runs, each logging its one model: (run id, checkpoint, module). Registry tests register
    them into names of their own."""
    return log_trained_runs(store[0], "registry", tmp_path_factory.mktemp("checkpoints"))


def test_one_copy_of_the_weights_per_run_and_the_checkpoint_comes_back_byte_identical(store, trained, tmp_path):
    uri, root = store
    run_id, path, _ = trained[0]
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id)] == []  # no checkpoint artifact beside the model
    (logged,) = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id],
                                            filter_string=f"source_run_id = '{run_id}'")
    assert logged.name == "model"
    weights = [p for p in (root / "mlartifacts").rglob("*.pt")] + [p for p in (root / "mlartifacts").rglob("*.pth")]
    assert len([p for p in weights if hashlib.md5(p.read_bytes()).hexdigest() ==
                hashlib.md5(path.read_bytes()).hexdigest()]) == 1  # stored once in the whole store
    mlflow.set_tracking_uri(uri)
    back = models.download_checkpoint(f"models:/{logged.model_id}", tmp_path)
    assert back.read_bytes() == path.read_bytes()


def test_tracking_uri_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert not (tmp_path / "mlflow.db").exists()  # resolving creates nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5999"


def test_git_state_reads_commit_and_dirty_tree(tmp_path):
    assert runs.git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("one")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("not part of the tree")
    assert runs.git_state(tmp_path) == {"git_commit": sha, "git_dirty": "false"}
    (tmp_path / "a.txt").write_text("two")
    assert runs.git_state(tmp_path)["git_dirty"] == "true"


def test_a_stage_run_records_params_lineage_metrics_and_data(store, tmp_path, monkeypatch):
    uri, root = store
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    manifest = tmp_path / "test.csv"
    manifest.write_text("path,label,label_name,video_id,group\nv/a.mp4,0,wave,a,g1\nv/b.mp4,1,clap,b,g2\n")
    params = {"finetune": {"lr": 0.001, "milestones": [5, 10]}, "model": {"name": "resnet18", "kwargs": {}}}
    parent = runs.create_parent_run("study-x", experiment="lineage", tracking_uri=uri, tags={"stage": "study"})
    with start_stage_run(
        "evaluate", experiment="lineage", tracking_uri=uri, params=flatten(params), params_hash="abc123",
        source_run_id="source-run", parent_run_id=parent.run_id, data_digests={"pretrain": "d" * 32},
        tags={"study": "x"}, repo_dir=tmp_path,
    ) as run:  # fmt: skip
        digest = run.log_manifest(manifest, context="test")
        for epoch in (1, 2):
            run.log_epoch({"epoch": epoch, "val_loss": 1.0 / epoch, "per_class": np.zeros(3)}, step=epoch)
        (tmp_path / "metrics.json").write_text("{}")
        run.log_artifact(tmp_path / "metrics.json", "reports")

    client = MlflowClient(uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "evaluate"
    assert logged.data.params == {
        "finetune.lr": "0.001", "finetune.milestones": "[5, 10]", "model.name": "resnet18", "model.kwargs": "{}",
    }  # fmt: skip
    tags = logged.data.tags
    assert digest == hashlib.md5(manifest.read_bytes()).hexdigest()
    assert tags["stage"] == "evaluate" and tags["params_hash"] == "abc123" and tags["source_run_id"] == "source-run"
    assert tags["mlflow.parentRunId"] == parent.run_id and tags["study"] == "x"  # nested under the study's run
    assert tags["git_commit"] == "unknown" and tags["data_digest.pretrain"] == "d" * 32
    assert tags["data_digest.test"] == digest
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "val_loss")] == [(1, 1.0), (2, 0.5)]
    assert set(logged.data.metrics) == {"val_loss"}  # "epoch" and arrays are not metrics
    (dataset_input,) = logged.inputs.dataset_inputs
    assert dataset_input.dataset.digest == digest and dataset_input.dataset.name == f"{tmp_path.name}/test"
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "test"
    assert [a.path for a in client.list_artifacts(run.run_id, "reports")] == ["reports/metrics.json"]
    assert (root / "mlartifacts" / "lineage").is_dir()  # artifacts beside the sqlite file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "test.csv"]


def test_a_failing_stage_marks_its_run_failed(store):
    uri, _ = store
    with pytest.raises(RuntimeError, match="boom"):
        with start_stage_run("pretrain", experiment="failures", tracking_uri=uri) as run:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"


def test_registry_promotion_rules_and_champion_loads_back(store, trained):
    uri, _ = store
    promotion_flow(uri, "action3d-unit", trained)


def test_register_refuses_what_it_cannot_judge(store):
    uri, _ = store
    with start_stage_run("finetune", experiment="registry", tracking_uri=uri) as run:
        pass
    with pytest.raises(KeyError, match="video_top1"):
        register_model(run.run_id, "m", metrics={"top1": 0.5}, data_digest="x", metric_key="video_top1",
                       tracking_uri=uri)  # fmt: skip
    with pytest.raises(LookupError, match="logged no model"):
        register_model(run.run_id, "m", metrics={"video_top1": 0.5}, data_digest="x", metric_key="video_top1",
                       tracking_uri=uri)  # fmt: skip


def test_challenger_is_the_best_version_that_did_not_beat_the_champion(store, trained):
    uri, _ = store
    name, client = "runner-up", MlflowClient(uri)
    run_ids = [run_id for run_id, _, _ in trained]

    def register(i: int, score: float, digest: str = "split-a"):
        return register_model(run_ids[i], name, metrics={"video_top1": score}, data_digest=digest,
                              metric_key="video_top1", tracking_uri=uri)

    def challenger() -> str:
        return str(client.get_model_version_by_alias(name, CHALLENGER).version)

    assert register(0, 0.9).alias == CHAMPION
    assert register(1, 0.5).alias == CHALLENGER and challenger() == "2"
    assert register(2, 0.7).alias == CHALLENGER and challenger() == "3"  # better than the challenger: takes it
    fourth = register(3, 0.6)  # beats neither: the challenger stays, the new version holds no alias
    assert fourth.alias is None and challenger() == "3" and list(client.get_model_version(name, "4").aliases) == []
    assert "nor challenger v3's 0.7" in fourth.reason and f"models:/{name}/4" in fourth.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    # registered again: nothing changes, and it says it holds no alias
    assert (register(3, 0.6).alias, register(3, 0.6).created) == (None, False)

    seen = registry.read_aliases(name, tracking_uri=uri)
    assert {alias: (v.version, v.score, v.data_digest) for alias, v in seen.items()} == {
        CHAMPION: ("1", 0.9, "split-a"), CHALLENGER: ("3", 0.7, "split-a")}
    assert seen[CHALLENGER].run_id == run_ids[2] and seen[CHALLENGER].metric_key == "video_top1"
    assert registry.read_aliases("never-registered", tracking_uri=uri) == {}


def test_the_report_reads_the_registry_aliases_now_not_those_of_the_registration(store, trained, tmp_path,
                                                                                  monkeypatch):
    from action3d.report import terminal_summary

    uri, _ = store
    name = "reported"
    run_ids = [run_id for run_id, _, _ in trained]
    done = [register_model(run, name, metrics={"video_top1": score}, data_digest="split-a", metric_key="video_top1",
                           tracking_uri=uri) for run, score in zip(run_ids, (0.5, 0.4))]
    (tmp_path / ".dvc").mkdir()
    runs_dir = tmp_path / "runs"
    for model in ("finetune", "scratch"):
        (runs_dir / "evaluate" / model).mkdir(parents=True)
        (runs_dir / "evaluate" / model / "metrics.json").write_text(json.dumps({"video_top1": 0.4, "videos": 3}))
    side = {"video_top1": 0.4, "video_top1_low": 0.1, "video_top1_high": 0.8}
    (runs_dir / "metrics.json").write_text(json.dumps({
        "chance": 1 / 3, "test_videos": 3, "finetune": side, "scratch": side, "transfer_gain": 0.0,
        "transfer_gain_low": -0.3, "transfer_gain_high": 0.3, "transfer_gain_p": 1.0}))
    (runs_dir / "register").mkdir()
    record = {"name": name, "version": done[1].version, "alias": done[1].alias, "reason": done[1].reason}
    (runs_dir / "register/registration.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # since this workspace registered v2 as challenger, a queued experiment registered a better one: v3 is champion
    register_model(run_ids[2], name, metrics={"video_top1": 0.8}, data_digest="split-a", metric_key="video_top1",
                   tracking_uri=uri)  # fmt: skip
    shown = terminal_summary(runs_dir)
    assert "this workspace's run made version 2 (at registration: challenger" in shown
    assert "version 2 holds challenger" in shown and "champion v3: video_top1 0.8 on test data split-a" in shown
    assert f"load_model('models:/{name}/2')" in shown and f"load_model('models:/{name}@champion')" in shown
    assert "now v3, another model" in shown
    assert "the difference is NOT shown: its interval holds 0" in shown  # the gain's interval [-30, +30] points

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")  # no store: one line, not created
    shown = terminal_summary(runs_dir)
    assert "registry now      cannot be read from" in shown and f"models:/{name}/2" in shown
    assert not (tmp_path / "none.db").exists()
    record["name"] = "not-in-this-store"
    (runs_dir / "register/registration.json").write_text(json.dumps(record))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert "not-in-this-store has no champion or challenger in" in terminal_summary(runs_dir)


# --- re-scoring a champion measured on another test split -------------------------------------------------------


def test_a_champion_from_another_test_split_is_rescored_before_the_comparison(store, trained):
    uri, _ = store
    name, client, calls = "rescored", MlflowClient(uri), []
    on_new_split = {hashlib.md5(path.read_bytes()).hexdigest(): score
                    for (_, path, _), score in zip(trained, [0.5, 0.7, 0.2, 0.3])}

    def rescore(checkpoint):  # the real scoring is the evaluate stage's (tests/pipeline): here, a score per file
        calls.append(checkpoint.name)
        return {"video_top1": on_new_split[hashlib.md5(checkpoint.read_bytes()).hexdigest()], "video_top5": 1.0,
                "videos": 9}

    def register(i: int, score: float, digest: str):
        return register_model(trained[i][0], name, metrics={"video_top1": score}, data_digest=digest,
                              metric_key="video_top1", tracking_uri=uri, rescore=rescore)

    assert register(0, 0.9, "split-a").alias == CHAMPION and calls == []
    # the test split changes: v1 measured 0.9 on split-a, its checkpoint scores 0.5 on split-b; v2 measures 0.6
    second = register(1, 0.6, "split-b")
    assert (second.alias, calls) == (CHAMPION, ["model.pt"])  # the served model's own checkpoint, downloaded
    assert second.compared == {"version": "1", "score": 0.5, "rescored": True}
    v1 = client.get_model_version(name, "1").tags
    assert v1["metric.video_top1"] == "0.9" and v1["rescore.split-b.video_top1"] == "0.5"
    assert v1["rescore.split-b.videos"] == "9.0"
    v2 = client.get_model_version(name, "2").tags
    assert (v2["compared.version"], v2["compared.video_top1"], v2["compared.rescored"]) == ("1", "0.5", "true")
    assert "beats v1's 0.5 on test split split-b" in v2["promotion"] and "re-scored" in v2["promotion"]

    # again: champion v2 scores 0.7 on split-c, so 0.65 measured there does not take over (no blind promotion)
    third = register(2, 0.65, "split-c")
    assert third.alias == CHALLENGER and "does not beat champion v2's 0.7 on test split split-c" in third.reason
    assert client.get_model_version_by_alias(name, CHAMPION).version in ("2", 2)
    assert client.get_model_version(name, "2").tags["rescore.split-c.video_top1"] == "0.7"
    # a champion is re-scored once per split; a tie with its re-score keeps it
    fourth = register(3, 0.7, "split-c")
    assert fourth.alias == CHALLENGER and len(calls) == 2
    assert client.get_model_version_by_alias(name, CHAMPION).version in ("2", 2)
    assert list(client.get_model_version(name, "4").aliases) == [CHALLENGER]


def test_a_champion_that_cannot_be_rescored_stops_the_registration(store, tmp_path):
    """Its checkpoint cannot be fetched (the artifact store lost it): the registration stops, naming the version
    and what to do, and creates no version."""
    uri, root = store
    name, client = "unscorable", MlflowClient(uri)
    path, _ = checkpoint(tmp_path, 7)
    with start_stage_run("finetune", experiment="lost", tracking_uri=uri) as first:
        first.log_model(path, CARD)
    with start_stage_run("finetune", experiment="lost", tracking_uri=uri) as second:
        second.log_model(path, CARD)
    register_model(first.run_id, name, metrics={"video_top1": 0.9}, data_digest="split-a", metric_key="video_top1",
                   tracking_uri=uri)  # fmt: skip
    shutil.rmtree(root / "mlartifacts" / "lost")  # the store's files of that experiment are gone
    with pytest.raises(LookupError, match="champion v1 of unscorable .* cannot be fetched"):
        register_model(second.run_id, name, metrics={"video_top1": 0.5}, data_digest="split-b",
                       metric_key="video_top1", tracking_uri=uri,
                       rescore=lambda path: pytest.fail("nothing to score"))  # fmt: skip
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert client.get_model_version_by_alias(name, CHAMPION).version in ("1", 1)


def test_an_experiment_whose_artifacts_live_outside_a_moved_project_is_refused(tmp_path):
    """MLflow keeps an experiment's artifact folder as an absolute path: a copied project would go on writing into
    the first folder. Starting a run there stops, naming both, before anything is written."""
    from action3d.tracking.store import TrackingError

    first = tmp_path / "first"
    first.mkdir()
    with start_stage_run("check", experiment="moved", tracking_uri=f"sqlite:///{first / 'mlflow.db'}"):
        pass
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    with pytest.raises(TrackingError, match=r"experiment 'moved' .* keeps its artifacts in .*first/mlartifacts/moved"
                                            r".* outside the store's folder.*tracking.experiment"):
        with start_stage_run("check", experiment="moved", tracking_uri=f"sqlite:///{copy / 'mlflow.db'}"):
            pytest.fail("a run started")
    with start_stage_run("check", experiment="moved-2", tracking_uri=f"sqlite:///{copy / 'mlflow.db'}") as run:
        pass  # a new experiment in the copy keeps its artifacts there
    assert Path(MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_run(run.run_id).info.artifact_uri
                .removeprefix("file://")).is_relative_to(copy)


# --- two registrations at once --------------------------------------------------------------------------------

def test_two_registrations_at_once_end_with_one_champion_the_better(store, trained, tmp_path):
    uri, _ = store
    race(uri, [run_id for run_id, _, _ in trained], "race", tmp_path, RACE_ROUNDS)


def test_a_late_alias_write_of_a_concurrent_registration_is_undone(store, trained, monkeypatch):
    """The interleaving a race may or may not hit, forced: right after this registration points `champion` at its
    better version, another one's write lands, computed from a read made before this version existed. The
    registration's re-read sees it and puts the champion back."""
    uri, _ = store
    name, client = "late-write", MlflowClient(uri)
    runs = [run_id for run_id, _, _ in trained]
    register_model(runs[0], name, metrics={"video_top1": 0.4}, data_digest="split-a", metric_key="video_top1",
                   tracking_uri=uri)  # fmt: skip
    original, late = MlflowClient.set_registered_model_alias, []

    def set_alias(self, model, alias, version):
        original(self, model, alias, version)
        if alias == CHAMPION and str(version) == "2" and not late:
            late.append(version)
            original(self, model, CHAMPION, "1")  # the other registration's stale write

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias)
    second = register_model(runs[1], name, metrics={"video_top1": 0.6}, data_digest="split-a",
                            metric_key="video_top1", tracking_uri=uri)  # fmt: skip
    assert late and (second.version, second.alias) == ("2", CHAMPION)
    assert client.get_model_version_by_alias(name, CHAMPION).version in ("2", 2)


# --- what tracked files may hold ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:////home/me/proj/mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite:////home/me/proj/store/m.db?timeout=20", "sqlite:///store/m.db?timeout=20"),
        ("sqlite:////srv/shared/mlflow.db", "sqlite:///../../../srv/shared/mlflow.db"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("postgresql://user:secret@127.0.0.1:1/db", "postgresql://user:***@127.0.0.1:1/db"),
        ("postgresql+psycopg2://user:s%40cret@db.internal/mlflow?sslmode=require&password=secret",
         "postgresql+psycopg2://user:***@db.internal/mlflow?sslmode=require&password=***"),
        ("mysql://root@localhost/mlflow", "mysql://root@localhost/mlflow"),
        ("http://user:secret@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),
        ("https://mlflow.example.com/?token=secret", "https://mlflow.example.com/?token=***"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("file:///home/me/proj/mlruns", "mlruns"),
        ("/home/me/proj/mlruns", "mlruns"),
        ("databricks", "databricks"),
    ],
)
def test_a_recorded_tracking_uri_holds_no_password_and_no_machine_path(uri, expected):
    assert shareable_uri(uri, root="/home/me/proj") == expected
    assert "secret" not in shareable_uri(uri, root="/home/me/proj")


def test_a_recorded_sqlite_uri_is_relative_to_the_project_root(tmp_path, monkeypatch):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # project_root() finds the folder with .dvc
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert shareable_uri(tracking_uri()) == "sqlite:///mlflow.db"
