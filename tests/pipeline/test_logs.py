"""What a stage prints when its output goes to a log file (dvc repro, Prefect, CI): no progress bars, one line per
epoch, and with --quiet only the final JSON line; history.csv holds no wall-clock fields."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.helpers import write_tiny_params

pytestmark = pytest.mark.slow  # trains in a subprocess, as DVC runs a stage


def _pretrain(workdir, out: str, *extra: str) -> subprocess.CompletedProcess:
    params = write_tiny_params(workdir)
    command = [sys.executable, "-m", "action3d.cli", "stage", "scratch", "--role", "pretrain", "--params", str(params),
               *extra, "--manifests", "data/splits/pretrain", "--cache", "data/cache/pretrain", "--out", out]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)  # pipes: no TTY
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_stage_logs_one_line_per_epoch_and_no_bars_when_not_at_a_terminal(workdir):
    done = _pretrain(workdir, "runs/pretrain")
    output = done.stdout + done.stderr
    assert "\r" not in output
    epochs = [line for line in output.splitlines() if line.startswith("[scratch@pretrain] epoch ")]
    assert [line.split()[2] for line in epochs] == ["1/2:", "2/2:"]
    assert json.loads(done.stdout.splitlines()[-1])["epochs"] == 2  # the final JSON line

    with open(workdir / "runs/pretrain/history.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "train_loss" in header and not [k for k in header if k.endswith("_per_s")]


def test_quiet_prints_no_epoch_lines_but_the_final_json(workdir):
    done = _pretrain(workdir, "runs/quiet", "--quiet")
    output = done.stdout + done.stderr
    assert "\r" not in output
    assert not [line for line in output.splitlines() if line.startswith("[scratch@pretrain] epoch")]
    assert json.loads(done.stdout.strip().splitlines()[-1])["epochs"] == 2
