"""The Prefect flow runs the real stages end to end on Prefect's ephemeral local API (no server to set up)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.pipeline.conftest import ROOT, write_tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_flow_runs_every_stage_and_registers_the_model(tmp_path):
    (tmp_path / ".dvc").mkdir()
    write_tiny_params(tmp_path)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_DISABLE_TELEMETRY": "true",
           # the ephemeral server gets 20 s to start by default: too little on a busy 2-core CI machine
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, str(ROOT / "flows/pipeline.py"), "--params", "params.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Completed" in done.stdout + done.stderr
    for which in ("finetune", "scratch"):
        metrics = json.loads((tmp_path / f"runs/evaluate/{which}/metrics.json").read_text())
        rows = list(csv.DictReader(open(tmp_path / f"runs/evaluate/{which}/predictions.csv")))
        assert len(rows) == metrics["videos"] > 0
        assert metrics["video_top1"] == pytest.approx(sum(r["actual"] == r["predicted"] for r in rows) / len(rows))
    registration = json.loads((tmp_path / "runs/register/registration.json").read_text())
    assert registration["alias"] == "champion" and registration["version"] == "1"
    assert (tmp_path / "mlflow.db").is_file()  # tracked in the project's own store
