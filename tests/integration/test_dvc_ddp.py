"""`dvc repro` with `scratch.pretrain.nproc: 2`: the unchanged dvc.yaml trains the stage as two DDP ranks (gloo on the CPU)
under torchrun, and the stage's outputs and result line come once, from rank 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_project_repo, ran, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _result_lines(output: str) -> list[dict]:
    """The training stages' final JSON lines in a `dvc repro` log."""
    found = []
    for line in output.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "epochs_resumed" in value:
            found.append(value)
    return found


@pytest.fixture(scope="module")
def ddp_repro(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny repository with `scratch.pretrain.nproc: 2`, after `dvc repro scratch@pretrain`."""
    # 9 training videos in 2 shards of 5 (padded): batches of 2, each shard's last clip dropped, since a batch of
    # one clip is one BatchNorm cannot train on (the loader drops a partial batch whenever a full one remains).
    repo = make_project_repo(tmp_path_factory.mktemp("ddp") / "repo", ["scratch.pretrain.nproc=2",
                                                                      "scratch.pretrain.batch_size=2"])
    return repo, run(repo, "dvc", "repro", "scratch@pretrain")


def test_repro_trains_pretrain_on_two_ranks(ddp_repro):
    from mlflow import MlflowClient

    repo, done = ddp_repro
    assert "scratch@pretrain" in ran(done.stdout)

    [result] = _result_lines(done.stdout)  # rank 0 alone prints it
    assert result["epochs"] == 2 and result["epochs_resumed"] == 0
    assert (repo / "runs/scratch/pretrain/model.pt").is_file()
    run_id = json.loads((repo / "runs/scratch/pretrain/run.json").read_text())["run_id"]
    logged = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(run_id)
    assert logged.data.tags["world_size"] == "2"
    assert logged.data.params["scratch.pretrain.nproc"] == "2"
    epochs = [line for line in done.stdout.splitlines() if line.startswith("[scratch@pretrain] epoch")]
    assert len(epochs) == 2  # rank 0's alone


def test_sigterm_stops_every_rank(ddp_repro):
    """A stopped `dvc repro` (or a cancelled flow) sends SIGTERM to the stage's command: it reaches the ranks."""
    repo, _ = ddp_repro
    command = [sys.executable, "-m", "action3d.cli", "stage", "scratch", "--role", "pretrain", "-S",
               "scratch.pretrain.epochs=50", "--manifests", "data/splits/pretrain", "--cache", "data/cache/pretrain",
               "--out", "runs/stopped"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # its own session: torchrun and the ranks share its process group, whose survivors the test can then find
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, start_new_session=True)
    try:
        for line in process.stdout:  # the ranks are training once rank 0 reports an epoch
            if line.startswith("[scratch@pretrain] epoch 1/"):
                break
        else:
            pytest.fail(f"the stage ended ({process.wait()}) before its first epoch")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while _group_alive(process.pid):
            assert time.monotonic() < deadline, "ranks still running 30 s after the stage was stopped"
            time.sleep(0.2)
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (repo / "runs/stopped/model.pt").exists()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
