"""`dvc repro` and `dvc exp` on the real dvc.yaml, in the session's tiny project repository (tests/conftest.py:
`pipeline` after its first `dvc repro`; `repo` puts it back to that state after a test changes it)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from action3d.project import file_md5
from tests.helpers import ran, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVERY_STAGE = {"check", "synth@pretrain", "synth@finetune", "split@pretrain", "split@finetune", "cache@pretrain-0",
               "cache@finetune-0", "scratch@pretrain", "scratch@finetune", "finetune", "evaluate@finetune",
               "evaluate@scratch", "summary", "register"}


def set_param(repo: Path, dotted: str, value) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def stale(repo: Path) -> set[str]:
    return set(json.loads(run(repo, "dvc", "status", "--json").stdout or "{}"))


def outputs(repo: Path) -> dict[str, bytes]:
    """Every file the pipeline wrote under runs/ (resumable checkpoints and timings aside), by path."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "runs").rglob("*"))
            if p.is_file() and not {"checkpoints", "timings"} & set(p.parts) and p.name != ".gitignore"}


def test_repro_runs_every_stage_then_nothing(pipeline, repo):
    assert ran(pipeline.first_output) == EVERY_STAGE
    metrics = json.loads((repo / "runs/evaluate/finetune/metrics.json").read_text())
    rows = (repo / "runs/evaluate/finetune/predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == metrics["videos"] > 0 and "time_shuffled_video_top1" in metrics
    assert metrics["video_top1"] == pytest.approx(sum(r.split(",")[1] == r.split(",")[2] for r in rows) / len(rows))
    assert json.loads((repo / "runs/register/registration.json").read_text())["alias"] == "champion"

    again = run(repo, "dvc", "repro")
    assert ran(again.stdout) == set() and "up to date" in again.stdout
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json").stdout)
    assert "transfer_gain_low" in json.dumps(shown)
    plots = run(repo, "dvc", "plots", "show", check=False)
    assert plots.returncode == 0 and "failed to load" not in plots.stdout + plots.stderr  # every plot exists

    report = run(repo, "action3d", "report").stdout
    summary = json.loads((repo / "runs/metrics.json").read_text())
    assert f"(a) fine-tuned from pretraining   video top-1 {100 * summary['finetune']['video_top1']:.1f}%" in report
    assert f"pretraining is worth {100 * summary['transfer_gain']:+.1f} points" in report
    assert "(d) overfitting, trained from scratch:" in report and "test / train" in report
    assert "registered model" in report and "mlflow ui --backend-store-uri sqlite:///" in report
    minutes = next(line for line in report.splitlines() if line.startswith("stage minutes"))
    assert all(stage in minutes for stage in EVERY_STAGE)  # each stage's own minutes


def test_the_report_holds_the_runs_numbers_and_opens_in_a_browser(repo, tmp_path):
    """`action3d report` after the pipeline: reports/index.html and README.md with the evaluate stages' numbers, the
    findings with their intervals and the champion's lineage; headless Chromium loads the page and every image."""
    run(repo, "action3d", "report")
    page, markdown = (repo / "reports/index.html").read_text(), (repo / "reports/README.md").read_text()
    for which, label in (("finetune", "fine-tuned from pretraining"), ("scratch", "from scratch on the small set")):
        metrics = json.loads((repo / f"runs/evaluate/{which}/metrics.json").read_text())
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {label}"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[6:10] == [f"{100 * metrics[k]:.1f}" for k in ("clip_top1", "video_top1", "video_top5")] + [
            str(metrics["videos"])]
        assert f"<td>{100 * metrics['video_top1']:.1f}</td>" in page
    assert "## What the pipeline shows" in markdown and "95% interval" in markdown
    assert "data/splits/finetune/train.csv (stage split@finetune)" in markdown

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no chromium on PATH: `make test` installs Debian's chromium package"
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}"]
    url = (repo / "reports/index.html").as_uri()
    dom = run(tmp_path, *browser, "--virtual-time-budget=10000", "--dump-dom", url, timeout=120).stdout
    loaded, total = map(int, re.search(r'data-images="(\d+)/(\d+)"', dom).groups())
    assert loaded == total == page.count("<img ") >= 5  # curves of the 3 training runs, 2 confusion matrices
    shot = tmp_path / "report.png"
    run(tmp_path, *browser, "--window-size=1200,1600", f"--screenshot={shot}", url, timeout=120)
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200) and pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and plots


def test_lineage_names_the_dvc_lock_outputs_the_champion_was_trained_on(repo):
    from action3d.stages.register import split_digest

    lineage = json.loads(run(repo, "action3d", "registry", "lineage", "action3d-demo@champion").stdout)
    finetune, pretrain = lineage["runs"][0], lineage["runs"][1]
    assert (finetune["stage"], pretrain["stage"]) == ("finetune", "scratch@pretrain")
    assert finetune["data"]["train"] == file_md5(repo / "data/splits/finetune/train.csv")
    assert finetune["data"]["pretrained"] == file_md5(repo / "runs/scratch/pretrain/model.pt")
    assert finetune["in_dvc_lock"]["train"] == ["data/splits/finetune/train.csv (stage split@finetune)"]
    assert finetune["in_dvc_lock"]["pretrained"] == ["runs/scratch/pretrain/model.pt (stage scratch@pretrain)"]
    assert pretrain["in_dvc_lock"]["val"] == ["data/splits/pretrain/val.csv (stage split@pretrain)"]
    assert lineage["test_data_digest"] == split_digest(repo / "data/splits/finetune/test.csv",
                                                       repo / "data/cache/finetune")


def test_a_code_change_makes_stale_what_runs_that_code_and_a_docs_change_nothing(repo):
    with open(repo / "README.md", "a") as f:
        f.write("\nA note.\n")
    assert stale(repo) == set()
    with open(repo / "src/action3d/engine.py", "a") as f:
        f.write("\n# a change of the training loop\n")
    assert stale(repo) == {"scratch@pretrain", "scratch@finetune", "finetune", "evaluate@finetune", "evaluate@scratch",
                           "register"}  # register re-scores a champion measured on another test split
    run(repo, "git", "checkout", "-q", "--", "src/action3d/engine.py")
    with open(repo / "src/action3d/data/annotations.py", "a") as f:
        f.write("\n# a change of the manifest parser\n")
    # the manifests, the slice lists the cache stages read through it, and the evaluation's test list
    assert stale(repo) == {"check", "split@pretrain", "split@finetune", "cache@pretrain-0", "cache@finetune-0",
                           "scratch@pretrain", "scratch@finetune", "finetune", "evaluate@finetune", "evaluate@scratch",
                           "register"}


def test_a_queued_knob_change_reruns_only_what_follows_a_failure_loses_nothing_and_the_knob_set_back_trains_nothing(
        repo):
    from mlflow import MlflowClient

    before = outputs(repo)
    registry = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    lr = yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["lr"]
    run(repo, "dvc", "exp", "run", "--queue", "-S", f"finetune.lr={lr * 2}", "-n", "lr-x2")
    run(repo, "dvc", "queue", "start", "-j", "1")
    log = run(repo, "dvc", "queue", "logs", "lr-x2", "-f", check=False, timeout=900).stdout  # follows until it ends
    assert re.search(r"lr-x2.*Success", run(repo, "dvc", "queue", "status").stdout)
    assert ran(log) == {"check", "finetune", "evaluate@finetune", "summary", "register"}, log
    # readable at a glance: short metric names, and the knob that changed
    every = run(repo, "dvc", "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    assert {"finetune.video_top1", "scratch.video_top1", "transfer_gain", "transfer_gain_low"} <= set(every), every
    assert not [c for c in every if c.endswith("metrics.json:video_top1")], every
    changed = run(repo, "dvc", "exp", "show", "--csv", "--only-changed").stdout.splitlines()
    columns = changed[0].split(",")
    assert "finetune.lr" in columns and "synth.seed" not in columns, columns
    assert any(str(lr * 2) in row.split(",")[columns.index("finetune.lr")] and "lr-x2" in row for row in changed[1:])
    assert outputs(repo) == before  # a queued experiment runs apart from the workspace
    versions = len(registry.search_model_versions("name = 'action3d-demo'"))

    # a stage that fails part way (a learning rate that makes the loss diverge) stops with the reason, and what
    # ran before it stays
    set_param(repo, "finetune.lr", 1.0e30)
    failed = run(repo, "dvc", "repro", check=False)
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "loss is" in said and "training stopped" in said
    assert ran(failed.stdout) == {"check", "finetune"}

    # the knob set back: DVC's run cache restores every output of that setting, nothing trains or registers again
    set_param(repo, "finetune.lr", lr)
    back = run(repo, "dvc", "repro")
    assert ran(back.stdout) <= {"check"}, back.stdout
    assert "is cached - skipping run" in back.stdout
    assert outputs(repo) == before
    assert len(registry.search_model_versions("name = 'action3d-demo'")) == versions


def test_a_params_typo_stops_before_any_output_is_removed(repo):
    before = outputs(repo)
    done = run(repo, "dvc", "exp", "run", "-S", "+finetune.lrr=0.01", check=False)
    assert done.returncode != 0
    assert "unknown key 'finetune.lrr'" in done.stdout + done.stderr
    assert ran(done.stdout) <= {"check"}
    before.pop("runs/params.ok")  # the check's own mark, which DVC removes before running it
    assert outputs(repo) == before  # every output of the stages that work still there, byte for byte
