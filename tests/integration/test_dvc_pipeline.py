"""`dvc repro` and `dvc exp` on the real dvc.yaml, in a fresh git repository, with the tiny demo params."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import ROOT, write_tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(os.sys.executable).parent


def _run(cwd: Path, *cmd: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set_param(repo: Path, dotted: str, value) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def first_repro(tmp_path_factory) -> tuple[Path, str]:
    """A fresh git + DVC repository with the real dvc.yaml, the package's sources (stages depend on them) and the
    tiny params, after its first `dvc repro`, committed. Returns the repository and that repro's output."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "README.md", repo / "README.md")
    write_tiny_params(repo)
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "config", "user.email", "ci@example.com")
    _run(repo, "git", "config", "user.name", "ci")
    _run(repo, "dvc", "init", "-q")
    _run(repo, "dvc", "config", "core.analytics", "false")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "tiny pipeline")
    first = _run(repo, "dvc", "repro")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline run")
    return repo, first.stdout


@pytest.fixture
def repo(first_repro) -> Path:
    """The repository as its baseline commit left it, whatever an earlier test changed."""
    repo, _ = first_repro
    _run(repo, "git", "checkout", "-q", "--", ".")
    _run(repo, "dvc", "checkout", "-q", check=False)
    return repo


def _stale(repo: Path) -> set[str]:
    return set(json.loads(_run(repo, "dvc", "status", "--json").stdout or "{}"))


def test_repro_runs_every_stage_then_nothing(first_repro, repo):
    _, first = first_repro
    assert _ran(first) == {"check", "synth", "split@pretrain", "split@finetune", "cache@pretrain", "cache@finetune",
                           "pretrain", "finetune", "scratch", "evaluate@finetune", "evaluate@scratch", "summary",
                           "register"}
    metrics = json.loads((repo / "runs/evaluate/finetune/metrics.json").read_text())
    rows = (repo / "runs/evaluate/finetune/predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == metrics["videos"] > 0 and "time_shuffled_video_top1" in metrics
    assert metrics["video_top1"] == pytest.approx(sum(r.split(",")[1] == r.split(",")[2] for r in rows) / len(rows))
    assert json.loads((repo / "runs/register/registration.json").read_text())["alias"] == "champion"

    again = _run(repo, "dvc", "repro")
    assert _ran(again.stdout) == set() and "up to date" in again.stdout

    shown = json.loads(_run(repo, "dvc", "metrics", "show", "--json").stdout)
    assert "video_top1" in json.dumps(shown)
    report = _run(repo, "action3d", "report").stdout
    assert "registered model" in report and "mlflow ui --backend-store-uri sqlite:///" in report


def test_the_report_holds_the_runs_numbers_and_opens_in_a_browser(repo, tmp_path):
    """`action3d report` after the pipeline: reports/index.html and README.md with the evaluate stages' numbers,
    the transfer comparison and the champion's lineage; headless Chromium loads the page and every image."""
    _run(repo, "action3d", "report")
    page, markdown = (repo / "reports/index.html").read_text(), (repo / "reports/README.md").read_text()
    for stage, label in (("finetune", "fine-tuned from pretraining"), ("scratch", "from scratch")):
        metrics = json.loads((repo / f"runs/evaluate/{stage}/metrics.json").read_text())
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[6:10] == [f"{100 * metrics[k]:.1f}" for k in ("clip_top1", "video_top1", "video_top5")] + [
            str(metrics["videos"])]
        assert f"<td>{100 * metrics['video_top1']:.1f}</td>" in page
    assert "## Transfer: pretrained vs scratch" in markdown and "data/splits/finetune/train.csv (stage split@finetune)" \
        in markdown

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no chromium on PATH: `make test` installs Debian's chromium package"
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    url = (repo / "reports/index.html").as_uri()
    dom = _run(tmp_path, *browser, "--virtual-time-budget=10000", "--dump-dom", url, timeout=120).stdout
    loaded, total = map(int, re.search(r'data-images="(\d+)/(\d+)"', dom).groups())
    assert loaded == total == page.count("<img ") >= 5  # curves of the 3 training runs, 2 confusion matrices
    shot = tmp_path / "report.png"
    _run(tmp_path, *browser, "--window-size=1200,1600", f"--screenshot={shot}", url, timeout=120)
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200) and pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and plots


def test_lineage_names_the_dvc_lock_outputs_the_champion_was_trained_on(repo):
    from action3d.stages.register import test_data_digest
    from action3d.storage import file_md5

    lineage = json.loads(_run(repo, "action3d", "registry", "lineage", "action3d-demo@champion").stdout)
    finetune, pretrain = lineage["runs"][0], lineage["runs"][1]
    assert (finetune["stage"], pretrain["stage"]) == ("finetune", "pretrain")
    assert finetune["data"]["train"] == file_md5(repo / "data/splits/finetune/train.csv")
    assert finetune["in_dvc_lock"]["train"] == ["data/splits/finetune/train.csv (stage split@finetune)"]
    assert pretrain["in_dvc_lock"]["val"] == ["data/splits/pretrain/val.csv (stage split@pretrain)"]
    assert lineage["test_data_digest"] == test_data_digest(repo / "data/splits/finetune/test.csv",
                                                           repo / "data/cache/finetune")


def test_a_code_change_makes_stale_what_runs_that_code_and_a_docs_change_nothing(repo):
    with open(repo / "README.md", "a") as f:
        f.write("\nA note.\n")
    assert _stale(repo) == set()
    with open(repo / "src/action3d/engine.py", "a") as f:
        f.write("\n# a change of the training loop\n")
    assert _stale(repo) == {"pretrain", "finetune", "scratch", "evaluate@finetune", "evaluate@scratch"}
    _run(repo, "git", "checkout", "-q", "--", "src/action3d/engine.py")
    with open(repo / "src/action3d/data/annotations.py", "a") as f:
        f.write("\n# a change of the manifest parser\n")
    assert _stale(repo) == {"split@pretrain", "split@finetune"}


def test_changing_finetune_lr_reruns_only_finetune_and_what_follows(repo):
    done = _run(repo, "dvc", "exp", "run", "-S", "finetune.lr=0.02")  # params.yaml has 0.01
    assert _ran(done.stdout) == {"check", "finetune", "evaluate@finetune", "summary", "register"}
    # readable at a glance: short metric names, and the knob that changed
    every = _run(repo, "dvc", "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    assert {"finetune.video_top1", "scratch.video_top1", "transfer_gain"} <= set(every), every
    assert not [c for c in every if c.endswith("metrics.json:video_top1")], every
    changed = _run(repo, "dvc", "exp", "show", "--csv", "--only-changed").stdout.splitlines()
    columns = changed[0].split(",")
    assert "finetune.lr" in columns and "synth.seed" not in columns, columns
    assert any("0.02" in row.split(",")[columns.index("finetune.lr")] for row in changed[1:])


def test_a_failed_stage_is_where_the_next_repro_starts(repo):
    _set_param(repo, "finetune.init", "checkpoint")  # with finetune.checkpoint null: a clear error
    failed = _run(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    assert "finetune.checkpoint" in failed.stdout + failed.stderr
    _set_param(repo, "finetune.init", "pretrain")
    _set_param(repo, "finetune.epochs", 3)  # a change of its own, so that finetune must run again
    resumed = _run(repo, "dvc", "repro")
    assert "pretrain" not in _ran(resumed.stdout) and "finetune" in _ran(resumed.stdout)


def test_queued_experiments_run_and_are_listed(repo):
    _run(repo, "dvc", "exp", "run", "--queue", "-S", "finetune.weight_decay=0.001", "-n", "wd-1e-3")
    _run(repo, "dvc", "queue", "start", "-j", "1")
    _run(repo, "dvc", "queue", "logs", "wd-1e-3", "-f", check=False, timeout=900)  # follows until it ends
    status = _run(repo, "dvc", "queue", "status").stdout
    assert re.search(r"wd-1e-3.*Success", status), status
    table = _run(repo, "dvc", "exp", "show", "--json").stdout
    assert "wd-1e-3" in table and "video_top1" in table


def _outputs(repo: Path) -> dict[str, bytes]:
    """Every file the pipeline wrote under runs/ (resumable checkpoints aside), by path."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "runs").rglob("*"))
            if p.is_file() and "checkpoints" not in p.parts and p.name != ".gitignore"}


def test_a_params_typo_stops_before_any_output_is_removed(repo):
    before = _outputs(repo)
    done = _run(repo, "dvc", "exp", "run", "-S", "+finetune.lrr=0.01", check=False)
    assert done.returncode != 0
    assert "unknown key 'finetune.lrr'" in done.stdout + done.stderr
    assert _ran(done.stdout) <= {"check"}
    before.pop("runs/params.ok")  # the check's own mark, which DVC removes before running it
    assert _outputs(repo) == before  # every output of the stages that work still there, byte for byte


def test_setting_a_knob_back_restores_the_outputs_from_the_run_cache(repo):
    from mlflow import MlflowClient

    before = _outputs(repo)
    lr = yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["lr"]
    _run(repo, "dvc", "exp", "run", "-S", f"finetune.lr={lr * 2}")
    registry = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = len(registry.search_model_versions("name = 'action3d-demo'"))
    _set_param(repo, "finetune.lr", lr)
    back = _run(repo, "dvc", "repro")
    assert _ran(back.stdout) <= {"check"}, back.stdout  # nothing trained, evaluated or registered again
    assert "is cached - skipping run" in back.stdout
    assert _outputs(repo) == before
    assert len(registry.search_model_versions("name = 'action3d-demo'")) == versions
