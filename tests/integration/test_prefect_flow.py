"""The pipeline flow on Prefect's ephemeral API (no server to set up), as `python flows/pipeline.py` runs it in a
clone of the project: every stage through `dvc repro`, the run saved as a DVC experiment, and nothing run twice.

The clone shares the DVC cache of the session's tiny pipeline, as workers share a remote's run cache: the stages
that pipeline already ran with these inputs and knobs are restored, the rest (a changed learning rate) run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_project_repo, ran, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _flow(repo, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(repo.parent / "prefect"), "MLFLOW_DISABLE_TELEMETRY": "true",
           # the ephemeral server gets 20 s to start by default: too little on a busy 2-core CI machine
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "flows/pipeline.py", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)


def _find(node, name: str):
    """The revision named `name` (the entry with its data) anywhere in `dvc exp show --json`'s nesting."""
    if isinstance(node, dict):
        if node.get("name") == name and "data" in node:
            return node
        node = list(node.values())
    if isinstance(node, list):
        return next((found for item in node if (found := _find(item, name)) is not None), None)
    return None


def test_the_flow_runs_the_dvc_pipeline_as_an_experiment_then_runs_nothing(tmp_path, pipeline):
    repo = make_project_repo(tmp_path / "repo")
    run(repo, "dvc", "cache", "dir", "--local", str(pipeline.repo / ".dvc" / "cache"))
    first = _flow(repo, "--name", "first", "-S", "finetune.lr=0.02")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    output = first.stdout + first.stderr
    assert ran(output) == {"check", "finetune", "evaluate@finetune", "summary", "register"}  # the knob's stages
    assert "Stage 'scratch@pretrain' is cached - skipping run" in output  # restored, as on a worker
    for which in ("finetune", "scratch"):
        metrics = json.loads((repo / f"runs/evaluate/{which}/metrics.json").read_text())
        rows = list(csv.DictReader(open(repo / f"runs/evaluate/{which}/predictions.csv")))
        assert len(rows) == metrics["videos"] > 0
        assert metrics["video_top1"] == pytest.approx(sum(r["actual"] == r["predicted"] for r in rows) / len(rows))
    registration = json.loads((repo / "runs/register/registration.json").read_text())
    assert registration["alias"] == "champion" and registration["version"] == "1"
    assert (repo / "mlflow.db").is_file()  # tracked in the project's own store

    dvc = [sys.executable, "-m", "dvc"]
    status = json.loads(subprocess.run([*dvc, "status", "--json"], cwd=repo, capture_output=True, text=True,
                                       check=True).stdout or "{}")
    assert status == {}  # DVC recorded every stage the flow ran: dvc.lock is complete
    shown = subprocess.run([*dvc, "exp", "show", "--json"], cwd=repo, capture_output=True, text=True, check=True)
    first_exp = _find(json.loads(shown.stdout), "first")
    assert first_exp["data"]["params"]["params.yaml"]["data"]["finetune"]["lr"] == 0.02  # the override, recorded
    ref = next(r for r in run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
               if r.endswith("/first"))
    committed = run(repo, "git", "diff", "--name-only", "HEAD", ref).stdout.split()
    assert committed == ["dvc.lock", "params.yaml"], committed  # no DVC output, no scratch file of DVC's

    lock, model = (repo / "dvc.lock").read_text(), (repo / "runs/finetune/model.pt").stat().st_mtime_ns
    again = _flow(repo, "--name", "again", "-S", "finetune.lr=0.02")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # DVC says up to date: the flow ran no stage and rewrote nothing
    assert "Running stage" not in again.stdout + again.stderr and "up to date, not run" in again.stdout + again.stderr
    assert (repo / "dvc.lock").read_text() == lock and (repo / "runs/finetune/model.pt").stat().st_mtime_ns == model


def test_a_bad_override_or_target_stops_the_flow_before_any_stage(tmp_path):
    repo = make_project_repo(tmp_path / "repo")
    typo = _flow(repo, "-S", "finetune.lrr=0.1")
    assert typo.returncode != 0 and "unknown key 'finetune.lrr'" in typo.stderr and "Did you mean" in typo.stderr
    target = _flow(repo, "--target", "pretrian")
    assert target.returncode != 0 and "no stage 'pretrian'" in target.stderr
    assert "Running stage" not in typo.stdout + typo.stderr + target.stdout + target.stderr
    assert not (repo / "data/demo").exists()
