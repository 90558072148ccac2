"""A training stage killed mid-run, whose local checkpoints are then gone (a retried task on a fresh worker), resumes
from the copies that `storage.checkpoints` mirrored to S3 (moto on loopback), with its real loaders (2 persistent
worker processes), to the very history of a run never interrupted, without training the finished epoch again."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, write_tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 2
TIMING = ("train_clips_per_s",)  # wall-clock measurements, the only entries two identical runs may differ in


def _command(params: Path, out: str, *overrides: str) -> list[str]:
    sets = [arg for o in (f"scratch.pretrain.epochs={EPOCHS}", "scratch.pretrain.workers=2", *overrides)
            for arg in ("-S", o)]
    return [sys.executable, "-m", "action3d.cli", "stage", "scratch", "--role", "pretrain", "--params", str(params),
            *sets, "--manifests", "data/splits/pretrain", "--cache", "data/cache/pretrain", "--out", out]


def _run(command: list[str], env: dict[str, str]) -> tuple[dict, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def _history(state: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in state["history"]]


def _mirrored(s3, bucket: str, key: str) -> dict | None:
    """The checkpoint at `key` in the bucket, or None when there is none yet."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


def _kill_once_mirrored(process: subprocess.Popen, workdir: Path, out: str, s3, bucket: str) -> str:
    """SIGKILL `process` once S3 holds the last.pt of its epoch 1; returns the mirror's key prefix. The process is
    stopped (SIGSTOP) while the object is read, so it cannot mirror epoch 2 before the kill."""
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, "the stage ended before the kill"
        assert time.monotonic() < deadline, "no mirrored checkpoint of epoch 1 within 4 minutes"
        folders = list(workdir.glob(f"{out}/checkpoints/*"))
        if folders:
            prefix = f"ckpt/scratch@pretrain/{folders[0].name}/"
            if s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "last.pt").get("KeyCount"):
                os.kill(process.pid, signal.SIGSTOP)
                epoch = _mirrored(s3, bucket, prefix + "last.pt")["epoch"]
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                assert epoch == 1, f"missed epoch 1: the mirror already holds epoch {epoch}"
                return prefix
        time.sleep(0.02)


def test_a_stage_on_a_fresh_worker_resumes_from_the_s3_mirror(workdir, s3_bucket, s3_env):
    params = write_tiny_params(workdir)
    # The checkpoint key hashes the package's source: every run imports one snapshot of it, so that an edit of the
    # working tree during the test cannot change the key between the runs.
    shutil.copytree(ROOT / "src/action3d", workdir / "code/action3d", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(workdir / "code")}
    straight, _ = _run(_command(params, "runs/straight"), env)  # no mirror: the reference
    assert straight["epochs"] == EPOCHS and straight["epochs_resumed"] == 0

    mirror = f"storage.checkpoints=s3://{s3_bucket}/ckpt"
    s3 = s3_env.client()
    process = subprocess.Popen(_command(params, "runs/killed", mirror), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    try:
        prefix = _kill_once_mirrored(process, workdir, "runs/killed", s3, s3_bucket)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert not (workdir / "runs/killed/model.pt").exists()  # it died mid-run
    shutil.rmtree(workdir / "runs/killed/checkpoints")  # the fresh worker: nothing local

    resumed, out = _run(_command(params, "runs/killed", mirror), env)
    assert f"[scratch@pretrain] restored epoch 1 from s3://{s3_bucket}/{prefix}" in out
    assert resumed["epochs_resumed"] == 1 and resumed["epochs"] == EPOCHS
    trained = [line.split()[2] for line in out.splitlines() if line.startswith("[scratch@pretrain] epoch")]
    assert trained == [f"2/{EPOCHS}:"]  # epoch 1 was not trained again

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]}
    assert keys == {prefix + "last.pt", prefix + "best.pt"}
    assert _mirrored(s3, s3_bucket, prefix + "last.pt")["epoch"] == EPOCHS  # the resumed run mirrors on
    local = workdir / "runs/killed/checkpoints" / prefix.split("/")[-2]
    assert sorted(p.name for p in local.iterdir() if p.name.endswith(".pt")) == ["best.pt", "last.pt"]
    assert not [p for p in local.iterdir() if p.name.startswith(".")]  # no partial download left
    straight_state = next((workdir / "runs/straight/checkpoints").glob("*/last.pt"))
    assert _history(torch.load(local / "last.pt", map_location="cpu", weights_only=True)) == _history(
        torch.load(straight_state, map_location="cpu", weights_only=True))
