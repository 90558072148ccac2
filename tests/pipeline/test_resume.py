"""Exact resume of a training stage with its real loaders (2 persistent workers): killed after epoch k, re-run, it
gives the very history of a run that was never interrupted, without training epochs 1..k again."""

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

from tests.helpers import write_tiny_params

pytestmark = pytest.mark.slow

EPOCHS, KILL_AFTER = 4, 2
TIMING = ("train_clips_per_s",)  # wall-clock measurements, the only entries two identical runs may differ in


def _command(params: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "action3d.cli", "stage", "scratch", "--role", "pretrain", "--params", str(params),
            "-S", f"scratch.pretrain.epochs={EPOCHS}", "-S", "scratch.pretrain.workers=2", "--manifests",
            "data/splits/pretrain", "--cache", "data/cache/pretrain", "--out", out]


def _last_checkpoint(workdir: Path, out: str) -> Path | None:
    found = list(workdir.glob(f"{out}/checkpoints/*/last.pt"))
    return found[0] if found else None


def _history(workdir: Path, out: str) -> list[dict[str, float]]:
    state = torch.load(_last_checkpoint(workdir, out), map_location="cpu", weights_only=True)
    return [{k: v for k, v in row.items() if k not in TIMING} for row in state["history"]]


def _run(command: list[str]) -> tuple[dict, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def _kill_after_epoch(process: subprocess.Popen, workdir: Path, out: str, epoch: int) -> None:
    """SIGKILL `process` once its last.pt holds `epoch`. Each new last.pt (written by rename, so a new inode) is read
    with the process stopped (SIGSTOP), so that it cannot train past the epoch it is read at before the kill."""
    seen, deadline = None, time.monotonic() + 240
    while True:
        assert process.poll() is None, "the stage ended before the kill"
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} within 4 minutes"
        path = _last_checkpoint(workdir, out)
        if path is not None and path.stat().st_ino != seen:
            os.kill(process.pid, signal.SIGSTOP)
            path = _last_checkpoint(workdir, out)
            written = torch.load(path, map_location="cpu", weights_only=True)["epoch"]
            assert written <= epoch, f"missed epoch {epoch}: the checkpoint already holds epoch {written}"
            if written == epoch:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return
            seen = path.stat().st_ino
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.02)


def test_a_killed_stage_resumes_to_the_uninterrupted_history(workdir):
    params = write_tiny_params(workdir)
    straight, straight_out = _run(_command(params, "runs/straight"))
    assert straight["epochs"] == EPOCHS and straight["epochs_resumed"] == 0

    process = subprocess.Popen(_command(params, "runs/killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _kill_after_epoch(process, workdir, "runs/killed", KILL_AFTER)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert not (workdir / "runs/killed/model.pt").exists()  # it died mid-run, before its last epoch

    resumed, resumed_out = _run(_command(params, "runs/killed"))
    assert resumed["epochs_resumed"] == KILL_AFTER and resumed["epochs"] == EPOCHS
    trained = [int(line.split()[2].split("/")[0]) for line in resumed_out.splitlines() if line.startswith("[scratch@pretrain]")]
    assert trained == list(range(KILL_AFTER + 1, EPOCHS + 1))  # epochs 1..k were not trained again
    assert _history(workdir, "runs/killed") == _history(workdir, "runs/straight")
