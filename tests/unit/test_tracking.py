"""tracking.py against a real MLflow sqlite store: runs, lineage tags, datasets, logged models, registry aliases."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from action3d import tracking
from action3d.stages.common import shareable_uri
from action3d.tracking import CHALLENGER, CHAMPION, register_model, start_stage_run

CLIP = (3, 4, 8, 8)  # [3, T, H, W] of the toy clips


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):  # [B, 3, T, H, W] -> [B, C]
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds); tests use their own names in it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        root = tmp_path_factory.mktemp("store")
        yield tracking.resolve_tracking_uri(root / "mlflow.db"), root


def log_trained_run(uri: str, experiment: str, seed: int) -> tuple[str, nn.Module]:
    """A finetune-like run that logs a model (example of batch 1: log_model must widen it to 2)."""
    torch.manual_seed(seed)
    model = TinyNet()
    with start_stage_run("finetune", experiment=experiment, tracking_uri=uri, params={"seed": seed}) as run:
        run.log_model(model, torch.randn(1, *CLIP))
    return run.run_id, model


def promotion_flow(uri: str, name: str, experiment: str) -> None:
    """The registry rules, end to end; shared with the integration test against `mlflow server`."""
    client = MlflowClient(uri)
    runs = {seed: log_trained_run(uri, experiment, seed) for seed in range(5)}

    def register(seed: int, score: float, digest: str = "split-a"):
        return register_model(
            runs[seed][0], name, metrics={"video_top1": score, "video_top5": 1.0}, data_digest=digest,
            metric_key="video_top1", tracking_uri=uri,
        )  # fmt: skip

    def aliases(version: str) -> list[str]:
        return list(client.get_model_version(name, version).aliases)

    first = register(0, 0.50)
    assert (first.version, first.alias, first.created) == ("1", CHAMPION, True)
    worse = register(1, 0.40)
    assert (worse.version, worse.alias) == ("2", CHALLENGER) and "does not beat" in worse.reason
    again = register(1, 0.40)
    assert (again.version, again.alias, again.created) == ("2", CHALLENGER, False)
    assert len(client.search_model_versions(f"name = '{name}'")) == 2  # idempotent: no third version
    tie = register(2, 0.50)
    assert tie.alias == CHALLENGER and aliases("3") == [CHALLENGER] and aliases("2") == []  # ties keep the champion
    better = register(3, 0.70)
    assert (better.version, better.alias) == ("4", CHAMPION) and aliases("1") == []
    tags = client.get_model_version(name, "4").tags
    assert tags["metric.video_top1"] == "0.7" and tags["data_digest"] == "split-a" and "beats" in tags["promotion"]
    assert client.get_model_version(name, "4").run_id == runs[3][0]
    # another test split: 0.30 is not comparable with 0.70; the version measured on the current split takes over
    moved = register(4, 0.30, digest="split-b")
    assert moved.alias == CHAMPION and "not comparable" in moved.reason
    assert client.get_model_version_by_alias(name, CHAMPION).version in ("5", 5)

    # the champion loads back through the registry and predicts on any batch size
    mlflow.set_tracking_uri(uri)
    x = torch.randn(3, *CLIP)
    expected = runs[4][1](x).detach().numpy()
    pyfunc = mlflow.pyfunc.load_model(tracking.champion_uri(name))
    np.testing.assert_allclose(pyfunc.predict(x.numpy()), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pyfunc.predict(x.double()), expected, rtol=1e-5, atol=1e-6)
    module = tracking.load_registered_model(name, tracking_uri=uri)
    assert isinstance(module, nn.Module) and not module.training
    np.testing.assert_allclose(module(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert tuple(module(x[:1]).shape) == (1, 5)


def test_a_logged_model_loads_as_a_plain_module_and_its_pyfunc_takes_numpy_or_torch(store):
    uri, _ = store
    torch.manual_seed(0)
    net = TinyNet()
    with start_stage_run("finetune", experiment="plain-module", tracking_uri=uri, params={"seed": 0}) as run:
        model_uri = run.log_model(net, torch.randn(1, *CLIP))
    mlflow.set_tracking_uri(uri)
    module = mlflow.pytorch.load_model(model_uri)
    assert isinstance(module, nn.Module) and not module.eval().training
    for frames in (8, 16):  # not the logged T (4): any clip length the architecture allows
        x = torch.randn(2, 3, frames, 8, 8)
        torch.testing.assert_close(module(x), net(x))
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    x = torch.randn(3, 3, 8, 8, 8)
    expected = net(x).detach().numpy()
    for data in (x.numpy(), x.numpy().astype(np.float64), x, x.double()):
        out = pyfunc.predict(data)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]") as err:
        pyfunc.predict(np.zeros((2, 4, 8, 8, 8)))
    assert len(str(err.value)) < 200  # the shape, not the tensor
    assert pyfunc.metadata.metadata["trained_clip"] == list(CLIP)


def test_tracking_uri_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(tmp_path / "m.db") == f"sqlite:///{tmp_path / 'm.db'}"
    assert not (tmp_path / "m.db").exists()  # resolving creates nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(tmp_path / "m.db") == "http://127.0.0.1:5999"


def test_git_state_reads_commit_and_dirty_tree(tmp_path):
    assert tracking.git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("one")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("not part of the tree")
    assert tracking.git_state(tmp_path) == {"git_commit": sha, "git_dirty": "false"}
    (tmp_path / "a.txt").write_text("two")
    assert tracking.git_state(tmp_path)["git_dirty"] == "true"


def test_a_stage_run_records_params_lineage_metrics_and_data(store, tmp_path, monkeypatch):
    uri, root = store
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    manifest = tmp_path / "test.csv"
    manifest.write_text("path,label,label_name,video_id,group\nv/a.mp4,0,wave,a,g1\nv/b.mp4,1,clap,b,g2\n")
    params = {"finetune": {"lr": 0.001, "milestones": [5, 10]}, "model": {"name": "resnet18", "kwargs": {}}}
    with start_stage_run(
        "evaluate", experiment="lineage", tracking_uri=uri, params=params, params_hash="abc123",
        parent_run_id="parent-run", data_digests={"pretrain": "d" * 32}, repo_dir=tmp_path,
    ) as run:  # fmt: skip
        digest = run.log_manifest(manifest, context="test")
        for epoch in (1, 2):
            run.log_epoch({"epoch": epoch, "val_loss": 1.0 / epoch, "per_class": np.zeros(3)}, step=epoch)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "metrics.json").write_text("{}")
        run.log_artifacts(tmp_path / "out", "reports")

    client = MlflowClient(uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "evaluate"
    assert logged.data.params == {
        "finetune.lr": "0.001", "finetune.milestones": "[5, 10]", "model.name": "resnet18", "model.kwargs": "{}",
    }  # fmt: skip
    tags = logged.data.tags
    assert digest == hashlib.md5(manifest.read_bytes()).hexdigest()
    assert tags["stage"] == "evaluate" and tags["params_hash"] == "abc123" and tags["parent_run_id"] == "parent-run"
    assert tags["git_commit"] == "unknown" and tags["data_digest.pretrain"] == "d" * 32
    assert tags["data_digest.test"] == digest
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "val_loss")] == [(1, 1.0), (2, 0.5)]
    assert set(logged.data.metrics) == {"val_loss"}  # "epoch" and arrays are not metrics
    (dataset_input,) = logged.inputs.dataset_inputs
    assert dataset_input.dataset.digest == digest and dataset_input.dataset.name == f"{tmp_path.name}/test"
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "test"
    assert [a.path for a in client.list_artifacts(run.run_id, "reports")] == ["reports/metrics.json"]
    assert (root / "mlartifacts" / "lineage").is_dir()  # artifacts beside the sqlite file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "test.csv"]



def test_a_failing_stage_marks_its_run_failed(store):
    uri, _ = store
    with pytest.raises(RuntimeError, match="boom"):
        with start_stage_run("pretrain", experiment="failures", tracking_uri=uri) as run:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"


def test_registry_promotion_rules_and_champion_loads_back(store):
    uri, _ = store
    promotion_flow(uri, "action3d-unit", "registry")


def test_register_refuses_what_it_cannot_judge(store):
    uri, _ = store
    with start_stage_run("finetune", experiment="registry", tracking_uri=uri) as run:
        pass
    with pytest.raises(KeyError, match="video_top1"):
        register_model(run.run_id, "m", metrics={"top1": 0.5}, data_digest="x", metric_key="video_top1",
                       tracking_uri=uri)  # fmt: skip
    with pytest.raises(LookupError, match="no logged model"):
        register_model(run.run_id, "m", metrics={"video_top1": 0.5}, data_digest="x", metric_key="video_top1",
                       tracking_uri=uri)  # fmt: skip


def test_challenger_is_the_best_version_that_did_not_beat_the_champion(store):
    uri, _ = store
    name, client = "runner-up", MlflowClient(uri)
    runs = [log_trained_run(uri, "registry", seed)[0] for seed in range(5)]

    def register(i: int, score: float, digest: str = "split-a"):
        return register_model(runs[i], name, metrics={"video_top1": score}, data_digest=digest,
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

    seen = tracking.read_aliases(name, tracking_uri=uri)
    assert {alias: (v.version, v.score, v.data_digest) for alias, v in seen.items()} == {
        CHAMPION: ("1", 0.9, "split-a"), CHALLENGER: ("3", 0.7, "split-a")}
    assert seen[CHALLENGER].run_id == runs[2] and seen[CHALLENGER].metric_key == "video_top1"
    assert tracking.read_aliases("never-registered", tracking_uri=uri) == {}


def test_the_report_reads_the_registry_aliases_now_not_those_of_the_registration(store, tmp_path, monkeypatch):
    from action3d.report import report

    uri, _ = store
    name = "reported"
    runs = [log_trained_run(uri, "registry", seed)[0] for seed in range(3)]
    done = [register_model(run, name, metrics={"video_top1": score}, data_digest="split-a", metric_key="video_top1",
                           tracking_uri=uri) for run, score in zip(runs, (0.5, 0.4))]
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "runs/evaluate/finetune").mkdir(parents=True)
    (tmp_path / "runs/evaluate/finetune/metrics.json").write_text(json.dumps(
        {"video_top1": 0.4, "video_top5": 1.0, "clip_top1": 0.4, "videos": 3}))
    (tmp_path / "runs/register").mkdir()
    record = {"name": name, "version": done[1].version, "alias": done[1].alias, "reason": done[1].reason}
    (tmp_path / "runs/register/registration.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # since this workspace registered v2 as challenger, a queued experiment registered a better one: v3 is champion
    register_model(runs[2], name, metrics={"video_top1": 0.8}, data_digest="split-a", metric_key="video_top1",
                   tracking_uri=uri)  # fmt: skip
    shown = report(tmp_path / "runs")
    assert "this workspace's run made version 2 (at registration: challenger" in shown
    assert "version 2 holds challenger" in shown and "champion v3: video_top1 0.8 on test data split-a" in shown
    assert f"load_model('models:/{name}/2')" in shown and f"load_model('models:/{name}@champion')" in shown
    assert "now v3, another model" in shown

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")  # no store: one line, not created
    shown = report(tmp_path / "runs")
    assert "registry now      cannot be read from" in shown and f"models:/{name}/2" in shown
    assert not (tmp_path / "none.db").exists()
    record["name"] = "not-in-this-store"
    (tmp_path / "runs/register/registration.json").write_text(json.dumps(record))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert "not-in-this-store has no champion or challenger in" in report(tmp_path / "runs")


# --- re-scoring a champion measured on another test split -------------------------------------------------------


def log_checkpointed_run(uri: str, experiment: str, seed: int, folder, scores_on_new_split: float) -> str:
    """A run that logs a model and, as the training stage does, `checkpoint/model.pt`. This fake checkpoint holds
    the score that the re-scoring function below reads from it (the real function is tested in tests/pipeline)."""
    torch.manual_seed(seed)
    checkpoint = folder / f"run{seed}" / "model.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text(str(scores_on_new_split))
    with start_stage_run("finetune", experiment=experiment, tracking_uri=uri, params={"seed": seed}) as run:
        run.log_model(TinyNet(), torch.randn(2, *CLIP))
        run.log_artifact(checkpoint, "checkpoint")
    return run.run_id


def test_a_champion_from_another_test_split_is_rescored_before_the_comparison(store, tmp_path):
    uri, _ = store
    name, client, calls = "rescored", MlflowClient(uri), []

    def rescore(checkpoint):
        calls.append(checkpoint.name)
        return {"video_top1": float(checkpoint.read_text()), "video_top5": 1.0, "videos": 9}

    runs = [log_checkpointed_run(uri, "rescore", seed, tmp_path, on_new_split)
            for seed, on_new_split in enumerate([0.5, 0.7, 0.2, 0.3])]

    def register(i: int, score: float, digest: str):
        return register_model(runs[i], name, metrics={"video_top1": score}, data_digest=digest,
                              metric_key="video_top1", tracking_uri=uri, rescore=rescore)

    assert register(0, 0.9, "split-a").alias == CHAMPION and calls == []
    # the test split changes: v1 measured 0.9 on split-a, its checkpoint scores 0.5 on split-b; v2 measures 0.6
    second = register(1, 0.6, "split-b")
    assert (second.alias, calls) == (CHAMPION, ["model.pt"])
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
    uri, _ = store
    name, client = "unscorable", MlflowClient(uri)
    first, second = (log_trained_run(uri, "rescore", seed)[0] for seed in (0, 1))  # no checkpoint/model.pt
    register_model(first, name, metrics={"video_top1": 0.9}, data_digest="split-a", metric_key="video_top1",
                   tracking_uri=uri)  # fmt: skip
    with pytest.raises(LookupError, match="checkpoint/model.pt"):
        register_model(second, name, metrics={"video_top1": 0.5}, data_digest="split-b", metric_key="video_top1",
                       tracking_uri=uri, rescore=lambda path: pytest.fail("nothing to score"))  # fmt: skip
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert client.get_model_version_by_alias(name, CHAMPION).version in ("1", 1)


# --- two registrations at once --------------------------------------------------------------------------------

# One process of a race: for each job, wait until the other process is at the same job, then register.
RACER = """
import json, sys, time
from pathlib import Path
from action3d.tracking import register_model
uri, sync, me, jobs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
done = []
for i, (name, run_id, score) in enumerate(jobs):
    (sync / f"{i}.{me}").touch()
    deadline = time.monotonic() + 120
    while len(list(sync.glob(f"{i}.*"))) < 2:
        if time.monotonic() > deadline:
            sys.exit(f"the other process never reached job {i}")
        time.sleep(0.001)
    r = register_model(run_id, name, metrics={"video_top1": score}, data_digest="split-a", metric_key="video_top1",
                       tracking_uri=uri)
    done.append([name, r.version, r.alias])
print(json.dumps(done))
"""


def race(uri: str, experiment: str, prefix: str, folder, rounds) -> None:
    """Two processes register two runs into the same model at the same moment, once per (score A, score B) of
    `rounds` (a fresh model name each); then exactly one version of each is champion: the better, or on a tie the
    older. Shared with the integration test against `mlflow server`."""
    runs = [log_trained_run(uri, experiment, seed)[0] for seed in (0, 1)]
    names = [f"{prefix}-{i}" for i in range(len(rounds))]
    sync = folder / "sync"
    sync.mkdir()
    processes = [
        subprocess.Popen([sys.executable, "-c", RACER, uri, str(sync), str(who),
                          json.dumps([[name, runs[who], scores[who]] for name, scores in zip(names, rounds)])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        for who in (0, 1)
    ]  # fmt: skip
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n---\n".join(e[-3000:] for e in errors)
    client = MlflowClient(uri)
    for name, scores in zip(names, rounds):
        versions = {v.run_id: str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
        assert len(versions) == 2, (name, versions, client.search_model_versions(f"name = '{name}'"))
        champions = [v for v in versions.values() if CHAMPION in client.get_model_version(name, v).aliases]
        a, b = versions[runs[0]], versions[runs[1]]
        expected = a if scores[0] > scores[1] else b if scores[1] > scores[0] else min(a, b, key=int)
        assert champions == [expected], (name, scores, versions, champions)
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == expected


RACE_ROUNDS = [(0.4, 0.6), (0.6, 0.4), (0.5, 0.5), (0.3, 0.8), (0.8, 0.3), (0.5, 0.5), (0.2, 0.9), (0.9, 0.2)]


def test_two_registrations_at_once_end_with_one_champion_the_better(store, tmp_path):
    uri, _ = store
    race(uri, "race", "race", tmp_path, RACE_ROUNDS)


def test_a_late_alias_write_of_a_concurrent_registration_is_undone(store, monkeypatch):
    """The interleaving a race may or may not hit, forced: right after this registration points `champion` at its
    better version, another one's write lands, computed from a read made before this version existed. The
    registration's re-read sees it and puts the champion back."""
    uri, _ = store
    name, client = "late-write", MlflowClient(uri)
    runs = [log_trained_run(uri, "race", seed)[0] for seed in (0, 1)]
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
    from action3d.stages.common import tracking_uri

    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert shareable_uri(tracking_uri()) == "sqlite:///mlflow.db"
