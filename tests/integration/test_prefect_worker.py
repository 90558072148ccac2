"""A scheduled run as users make it: a Prefect server and a process worker on loopback, the project deployed from
prefect.yaml (flows/deploy.py), moto's S3 as the DVC remote and the checkpoint mirror.

A worker started with no MLFLOW_TRACKING_URI refuses the run before any stage: its store would be a file inside the
temporary clone. A worker started as `make worker` starts it, tracking into the project's own store, clones a bare
`origin` repository, pulls nothing it does not need, runs the pipeline through DVC, and pushes the run back as a
DVC experiment, with the override it was given. The training process is killed once mid-run; the retried task
resumes from its checkpoint. A second run of the same knobs runs nothing: every stage comes back from the remote's
run cache. The project then sees the run and its registered champion in its own store, and a fresh clone pulls the
experiment and gets the very files the worker made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import BIN, free_port, make_project_repo, serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 3


def _run(cwd: Path, *argv, env: dict | None = None, check: bool = True, timeout: int = 600):
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _training_process(stage: str, mine: str) -> tuple[int, Path] | None:
    """(pid, working directory) of a running `action3d stage <stage>` under this test's worker (its environment
    holds `mine`; another test may train the same stage at the same time), if any."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"stage" in argv and stage.encode() in argv and b"pretrain" in argv and any(
                    a.endswith(b"action3d") for a in argv[:2]) and mine.encode() in (
                    proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name), Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
    return None


def _kill_mid_run(deadline: float, mine: str) -> int:
    """SIGKILL the worker's pretraining process once it has written a checkpoint and not yet finished; returns the
    epochs that checkpoint holds. Read with the process stopped, so it cannot train on while we look."""
    while time.monotonic() < deadline:
        found = _training_process("scratch", mine)
        if found:
            pid, cwd = found
            checkpoints = list(cwd.glob("runs/scratch/pretrain/checkpoints/*/last.pt"))
            if checkpoints:
                os.kill(pid, signal.SIGSTOP)
                epoch = torch.load(checkpoints[0], map_location="cpu", weights_only=True)["epoch"]
                os.kill(pid, signal.SIGKILL)
                return epoch
        time.sleep(0.05)
    pytest.fail("the worker's pretrain stage never wrote a checkpoint")


def _exp_ref(repo: Path, name: str, env: dict) -> str:
    refs = _run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps", env=env).stdout.split()
    return next(ref for ref in refs if ref.endswith(f"/{name}"))


def _worker(tmp_path: Path, env: dict, log: str) -> subprocess.Popen:
    (tmp_path / "worker").mkdir(exist_ok=True)
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gpu"], cwd=tmp_path / "worker",
                            env=env, stdout=open(tmp_path / log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(worker: subprocess.Popen) -> None:
    """Stop a worker as a user would: SIGTERM, and SIGKILL if it has not gone a minute later (a loaded machine)."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)


def _deployment_run(project: Path, env: dict, *params: str) -> subprocess.Popen:
    argv = [str(BIN / "prefect"), "deployment", "run", "action3d-pipeline/pipeline", "--param", "retry_delay_seconds=1",
            "--watch", "--watch-timeout", "900", *[a for p in params for a in ("--param", p)]]
    return subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_deployed_run_on_a_worker_loses_nothing_and_is_pulled_back_byte_identical(tmp_path, s3_bucket, s3_env):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig")}  # a worker with no git identity of its own
    for name in ("PYTHONPATH", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)

    # The project as a user has it: the remote set up by our command, pushed to `origin` (a bare repository).
    project = make_project_repo(tmp_path / "project", [f"scratch.pretrain.epochs={EPOCHS}",
                                                       f"storage.checkpoints=s3://{s3_bucket}/checkpoints"])
    _run(project, BIN / "action3d", "remote", "setup", f"s3://{s3_bucket}/dvc", env=env)
    # the data stages made here, recorded in dvc.lock and pushed: the worker pulls them instead of making them
    _run(project, BIN / "dvc", "repro", "cache@pretrain-0", "cache@finetune-0", env=env)
    _run(project, BIN / "dvc", "push", env=env)
    _run(project, "git", "add", "-A", env=env)
    _run(project, "git", "commit", "-qm", "DVC remote on S3, the data stages' lock", env=env)
    origin = tmp_path / "origin.git"
    _run(tmp_path, "git", "clone", "-q", "--bare", project, origin, env=env)
    project_store = f"sqlite:///{project / 'mlflow.db'}"  # what `make worker` gives a worker on this machine

    port = free_port()
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    server = [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with serve([str(a) for a in server], port=port, health_path="/api/health", env=env,
               log_path=tmp_path / "prefect-server.log", timeout=240):
        # our deploy script stops on a missing pool before deploying anything
        missing = _run(project, sys.executable, "flows/deploy.py", "--repository", origin, env=env, check=False)
        assert missing.returncode == 2 and "work pool 'cpu'" in missing.stderr and "prefect work-pool create" in (
            missing.stderr)
        for pool in ("gpu", "cpu"):  # training, and the data work of the cache flow
            _run(project, BIN / "prefect", "work-pool", "create", pool, "--type", "process", env=env)
        _run(project, sys.executable, "flows/deploy.py", "--repository", origin, "--require-remote", env=env)

        # a worker with no MLFLOW_TRACKING_URI: the run stops before any stage, saying why, and tracks nothing
        from mlflow import MlflowClient

        def tracked() -> list[str]:  # the project store's runs (the split stages above made some)
            client = MlflowClient(project_store)
            return sorted(r.info.run_id for e in client.search_experiments() for r in client.search_runs(
                [e.experiment_id]))

        before = tracked()
        worker = _worker(tmp_path, env, "refusing-worker.log")
        try:
            refused, _ = _deployment_run(project, env, "experiment=ci-refused").communicate(timeout=600)
        finally:
            _stop(worker)
        log = (tmp_path / "refusing-worker.log").read_text(errors="replace")
        assert "Completed" not in refused and "inside the worker's temporary clone" in log, refused + log[-3000:]
        assert "Running stage" not in log and tracked() == before

        worker = _worker(tmp_path, {**env, "MLFLOW_TRACKING_URI": project_store}, "worker.log")
        override = 'overrides=["finetune.lr=0.02"]'
        try:
            trigger = _deployment_run(project, env, "experiment=ci-nightly", override)
            killed_at = _kill_mid_run(time.monotonic() + 600, f"PREFECT_HOME={env['PREFECT_HOME']}")
            output, _ = trigger.communicate(timeout=900)
            log = (tmp_path / "worker.log").read_text(errors="replace")
            assert "Completed" in output, output[-3000:] + log[-5000:]
            again, _ = _deployment_run(project, env, "experiment=ci-again", override).communicate(timeout=900)
        finally:
            _stop(worker)
        second = (tmp_path / "worker.log").read_text(errors="replace")[len(log):]
        assert "Completed" in again, again[-3000:] + second[-5000:]
        assert "Running stage" not in second and second.count(": up to date, not run") == 14  # every stage
        for stage in ("synth@pretrain", "split@pretrain", "cache@finetune-0"):  # pulled from S3, not made again
            assert f"{stage}: up to date, not run" in log and f"Running stage '{stage}'" not in log
        assert "scratch@pretrain: ran scratch@pretrain" in log
        assert 1 <= killed_at < EPOCHS

        # Prefect: the pretraining task ran twice (killed, retried), every other stage once
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
        from prefect.settings import PREFECT_API_URL, temporary_settings

        flow_run_name = next(line.split("'")[1] for line in output.splitlines() if "Created flow run" in line)
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            flow_run = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(
                any_=[flow_run_name])))[0]
            assert flow_run.state.is_completed()
            task_runs = {t.name: t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
                id={"any_": [flow_run.id]}))}
        assert task_runs["scratch@pretrain"].run_count == 2 and task_runs["finetune"].run_count == 1

    # The project's own store holds the run: the resumed pretraining links to the killed one, the champion is there
    from mlflow import MlflowClient

    mlflow = MlflowClient(project_store)
    experiment = mlflow.get_experiment_by_name("action3d")
    pretrain_runs = mlflow.search_runs([experiment.experiment_id], "tags.stage = 'scratch@pretrain'",
                                       order_by=["attributes.start_time DESC"])
    resumed = pretrain_runs[0]
    assert resumed.data.tags["resumed_from"] == pretrain_runs[1].info.run_id
    assert resumed.data.metrics["epochs_resumed"] == killed_at
    listed = json.loads(_run(project, BIN / "action3d", "registry", "list", "--json", env=env).stdout)  # as a user
    champion = next(row for row in listed if "champion" in row["aliases"])
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(project)  # artifacts too

    # A laptop: a fresh clone pulls the experiment and gets the worker's outputs, checked against dvc.lock's md5s
    laptop = tmp_path / "laptop"
    _run(tmp_path, "git", "clone", "-q", "-b", "main", origin, laptop, env=env)
    _run(laptop, BIN / "dvc", "exp", "pull", "origin", "ci-nightly", env=env)
    shown = json.loads(_run(laptop, BIN / "dvc", "exp", "show", "--json", env=env).stdout)
    assert "ci-nightly" in json.dumps(shown)
    params = yaml.safe_load(_run(laptop, "git", "show", f"{_exp_ref(laptop, 'ci-nightly', env)}:params.yaml",
                                 env=env).stdout)
    assert params["finetune"]["lr"] == 0.02  # the run's override, recorded in its experiment
    committed = _run(laptop, "git", "diff", "--name-only", "HEAD", _exp_ref(laptop, "ci-nightly", env),
                     env=env).stdout.split()
    # the run's record, its knobs, and DVC's .gitignore entries for what it made: no output, no scratch file of DVC's
    assert {"dvc.lock", "params.yaml"} <= set(committed), committed
    assert all(p in ("dvc.lock", "params.yaml") or p.endswith(".gitignore") for p in committed), committed
    _run(laptop, BIN / "dvc", "exp", "apply", "ci-nightly", env=env)
    _run(laptop, BIN / "dvc", "checkout", env=env)
    assert json.loads(_run(laptop, BIN / "dvc", "status", "--json", env=env).stdout or "{}") == {}
    run_info = json.loads((laptop / "runs/finetune/run.json").read_text())
    assert run_info["run_id"] == champion["run_id"]
    from action3d.tracking.models import download_checkpoint

    import mlflow as fluent

    fluent.set_tracking_uri(project_store)
    try:
        logged = download_checkpoint(f"models:/action3d-demo/{champion['version']}", tmp_path / "logged")
    finally:
        fluent.set_tracking_uri(None)
    assert logged.read_bytes() == (laptop / "runs/finetune/model.pt").read_bytes()
    summary = json.loads((laptop / "runs/metrics.json").read_text())
    assert summary["test_videos"] > 0 and 0 <= summary["finetune"]["video_top1"] <= 1
