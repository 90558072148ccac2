"""The architecture study flow (flows/study.py) under Prefect's test harness, on a tiny project repository that
shares the session pipeline's DVC cache (so an entry restores the stages its knobs leave alone): an entry that
trains, and one that fails its check, which becomes a failed row."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, make_project_repo, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _study_flow():
    spec = importlib.util.spec_from_file_location("study_flow", ROOT / "flows/study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.study


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


def test_a_bad_entry_stops_the_study_before_anything_runs(tmp_path, harness, monkeypatch):
    repo = make_project_repo(tmp_path / "repo")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from action3d.study import StudyError

    with pytest.raises(StudyError, match="study entry 'typo'.*unknown key 'model.nmae'"):
        _study_flow()(entries={"ok": ["model.name=resnet10"], "typo": ["model.nmae=resnet18"]}, root=str(repo))
    with pytest.raises(StudyError, match="study entry 'dense'.*densenet121.*cannot be built.*widen_factor"):
        _study_flow()(entries={"dense": ["model.name=densenet121"]}, root=str(repo))  # the demo's kwargs are ResNet's
    assert not (repo / ".dvc/tmp/study").exists()


def test_the_study_runs_each_entry_through_dvc_and_collects_one_table(tmp_path, harness, monkeypatch, pipeline):
    repo = make_project_repo(tmp_path / "repo")
    run(repo, "dvc", "cache", "dir", "--local", str(pipeline.repo / ".dvc" / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # r10 pretrains for 3 epochs (and so fine-tunes anew); the broken entry fails its check: a failed row that still
    # has its model's size
    entries = {"r10": ["scratch.pretrain.epochs=3"],
               "broken": ["model.name=resnet18", "finetune.ft_begin_module=no_such_layer"]}
    rows = _study_flow()(entries=entries, name="ci", root=str(repo))

    by_entry = {row["entry"]: row for row in rows}
    assert set(by_entry) == set(entries)
    assert by_entry["broken"]["status"] == "failed" and "no_such_layer" in by_entry["broken"]["error"]
    for name, model in (("r10", "resnet10"),):
        row = by_entry[name]
        assert row["status"] == "ok" and row["model"] == model and row["experiment"] == f"ci-{name}"
        evaluated = json.loads(subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True, text=True,
            check=True).stdout)
        assert f"ci-{name}" in json.dumps(evaluated)
        # the row holds what the entry's own evaluate stage measured, as DVC recorded it
        clone = repo / ".dvc/tmp/study/ci" / name
        summary = json.loads((clone / "runs/metrics.json").read_text())
        assert row["finetune.video_top1"] == summary["finetune"]["video_top1"]
        assert row["scratch.video_top1"] == summary["scratch"]["video_top1"]
    assert by_entry["broken"]["params_m"] > by_entry["r10"]["params_m"] > 0  # resnet18 against resnet10
    assert by_entry["broken"]["gflops"] > by_entry["r10"]["gflops"] > 0

    table = list(csv.DictReader(open(repo / "reports/study/ci.csv")))
    assert [r["entry"] for r in table] == list(entries) and table[1]["status"] == "failed"
    assert (repo / "reports/study/ci.png").stat().st_size > 10_000

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("action3d")
    study_run = client.search_runs([experiment.experiment_id], "tags.study = 'ci' AND tags.stage = 'study'")[0]
    assert study_run.data.metrics["r10.finetune.video_top1"] == by_entry["r10"]["finetune.video_top1"]
    assert study_run.data.tags["failed"] == "broken"
    # every entry's runs went to the project's store (not a store of its clone), nested under the study's run
    runs = client.search_runs([experiment.experiment_id])
    mine = [r for r in runs if r.data.tags.get("study_entry") == "r10"]
    assert mine and all(r.data.tags["mlflow.parentRunId"] == study_run.info.run_id for r in mine)
    assert {r.data.tags["stage"] for r in mine} == {"scratch@pretrain", "finetune", "evaluate"}  # what it ran
    assert not [r for r in runs if r.data.tags.get("study_entry") == "broken"]  # stopped before any stage ran
    assert "no_such_layer" in by_entry["broken"]["error"] and "finetune.ft_begin_module" in by_entry["broken"]["error"]

    # the written report of the study: each entry's runs as rows, with the numbers its evaluate stage measured
    subprocess.run([sys.executable, "-m", "action3d.cli", "report", "--study", "ci"], cwd=repo, check=True,
                   capture_output=True)
    report = (repo / "reports/README.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| r10: fine-tuned from pretraining |"))
    assert f"| {100 * by_entry['r10']['finetune.video_top1']:.1f} |" in row
    assert "| r10: from scratch on the large set (pretraining) | resnet10 |" in report
