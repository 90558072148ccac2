"""`action3d data push/pull` against a real S3-compatible server (moto) on loopback, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _action3d(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "action3d.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_then_pull_restores_a_dataset_and_moves_only_changes(s3_bucket, tmp_path):
    raw = tmp_path / "ucf101"
    for i, name in enumerate(["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "Archery/v_Archery_g01_c01.avi",
                              "ucfTrainTestlist/classInd.txt"]):
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).write_bytes(os.urandom(1000 + 7919 * i))
    uri = f"s3://{s3_bucket}/datasets/ucf101"

    pushed = _action3d("data", "push", str(raw), uri)
    assert pushed.returncode == 0, pushed.stderr
    assert "3 file(s) moved" in pushed.stdout

    again = _action3d("data", "push", str(raw), uri)
    assert "0 file(s) moved" in again.stdout and "3 unchanged" in again.stdout

    pulled = _action3d("data", "pull", uri, str(tmp_path / "copy"))
    assert pulled.returncode == 0, pulled.stderr
    assert _tree(tmp_path / "copy") == _tree(raw)


def test_push_to_a_missing_bucket_is_one_clear_error(s3_env, tmp_path):
    (tmp_path / "a.txt").write_text("x")
    done = _action3d("data", "push", str(tmp_path), "s3://no-such-bucket/x")
    assert done.returncode == 2
    assert "no-such-bucket" in done.stderr and "Traceback" not in done.stderr
