"""Pretraining on two machines, as users run it: a Prefect server and two process workers of the `gpu` pool on
loopback, the project deployed from prefect.yaml, moto's S3 as the DVC remote, flows/train.py started on the
project's machine. Two nodes of one process each meet at a c10d rendezvous on loopback: node 0 runs the stage inside
DVC, the other joins. DVC records the outputs, MLflow holds one run, and the training matches one machine running two
processes of the same global batch. Then the same job with one node's training process killed mid-epoch: torchrun
restarts the ranks, they resume from the last checkpoint, and the history is the uninterrupted run's."""

from __future__ import annotations

import csv
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import BIN, free_port, pool_env, pool_project, prefect_pool, run_in

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 4


def _history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        for key in ("train_loss", "train_top1", "train_clips", "val_loss", "val_video_top1", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["epoch"], key)


def _ranks(mine: str) -> list[int]:
    """Pids of `action3d stage scratch` processes of this test's workers (their environment holds `mine`)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
            if b"scratch" in argv and b"stage" in argv and mine.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _kill_a_rank_mid_run(mine: str, stop: threading.Event, killed: list) -> None:
    """SIGKILL a training rank (a torchrun worker, not its agent) of this test's workers once its node has written a
    checkpoint: the owning node's rank, mid-way through a later epoch."""
    while not stop.is_set():
        for pid in _ranks(mine):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                clone = Path(os.readlink(f"/proc/{pid}/cwd"))
            except OSError:
                continue
            is_rank = any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ)
            if is_rank and list(clone.glob("runs/scratch/pretrain/checkpoints/*/last.pt")):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


def test_two_nodes_train_one_stage_as_one_run_and_survive_a_killed_rank(tmp_path, s3_bucket, s3_env):
    env = {**pool_env(tmp_path), "OMP_NUM_THREADS": "1"}
    knobs = [f"scratch.pretrain.epochs={EPOCHS}", "scratch.pretrain.batch_size=2", "scratch.pretrain.workers=0"]
    project, origin = pool_project(tmp_path, knobs, s3_bucket, env)
    store = f"sqlite:///{project / 'mlflow.db'}"

    # the yardstick: one machine, two processes, the same global batch (2 x 2)
    single = tmp_path / "single"
    run_in(tmp_path, "git", "clone", "-q", "-b", "main", origin, single, env=env)
    run_in(single, BIN / "dvc", "exp", "run", "-S", "scratch.pretrain.nproc=2", "scratch@pretrain",
           env={**env, "PYTHONPATH": str(single / "src")})
    reference = _history(single / "runs/scratch/pretrain/history.csv")
    assert len(reference) == EPOCHS

    def train(name: str):
        return run_in(project, sys.executable, "flows/train.py", "--stage", "scratch@pretrain", "--nnodes", "2",
                      "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--name", name, env=env)

    tracked = {"MLFLOW_TRACKING_URI": store}  # what `make worker` gives a worker on the project's machine
    with prefect_pool(tmp_path, project, origin, env, pool="gpu", worker_env=tracked) as worker_logs:
        first = train("ci-2nodes")
        between = time.time() * 1000
        mine = f"PREFECT_HOME={env['PREFECT_HOME']}"
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_a_rank_mid_run, args=(mine, stop, killed))
        killer.start()
        try:
            second = train("ci-2nodes-killed")
        finally:
            stop.set()
            killer.join()
        time.sleep(2)
        left = _ranks(mine)

    logs = "".join(log.read_text(errors="replace") for log in worker_logs)
    assert "trained on 2 nodes" in first.stdout + first.stderr, (first.stdout + first.stderr)[-3000:] + logs[-4000:]
    assert "trained on 2 nodes" in second.stdout + second.stderr, logs[-4000:]
    assert killed, "no training rank was seen to kill"
    assert left == [], f"ranks left running: {left}"

    from mlflow import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("action3d").experiment_id],
                              "tags.stage = 'scratch@pretrain'")
    first_runs = [r for r in runs if r.info.start_time < between]
    assert len(first_runs) == 1 and first_runs[0].data.tags["world_size"] == "2"  # one run for the two nodes' job

    for name in ("ci-2nodes", "ci-2nodes-killed"):  # both as the one-machine run: the killed one resumed exactly
        laptop = tmp_path / f"laptop-{name}"
        run_in(tmp_path, "git", "clone", "-q", "-b", "main", origin, laptop, env=env)
        run_in(laptop, BIN / "dvc", "exp", "pull", "origin", name, env=env)
        run_in(laptop, BIN / "dvc", "exp", "branch", name, f"b-{name}", env=env)
        run_in(laptop, "git", "checkout", "-q", f"b-{name}", env=env)
        run_in(laptop, BIN / "dvc", "pull", "scratch@pretrain", env=env)
        lock = yaml.safe_load((laptop / "dvc.lock").read_text())["stages"]
        assert "scratch@pretrain" in lock  # recorded by DVC, by node 0
        _same(_history(laptop / "runs/scratch/pretrain/history.csv"), reference)
        run_id = yaml.safe_load((laptop / "runs/scratch/pretrain/run.json").read_text())["run_id"]
        assert client.get_run(run_id).data.tags["world_size"] == "2"
        checkpoint = torch.load(laptop / "runs/scratch/pretrain/model.pt", map_location="cpu", weights_only=False)
        assert checkpoint["epoch"] == EPOCHS
