"""A tiny version of the demo pipeline: the real stages, on a few 64x48 videos, for one or two epochs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from action3d.config import load_params

ROOT = Path(__file__).resolve().parents[2]

# The project's params.yaml with the demo shrunk to seconds of work: every stage runs for real.
TINY = [
    "synth.width=64", "synth.height=48", "synth.seconds=1.0", "synth.crf=28", "synth.looks=2",
    "synth.pretrain.classes=3", "synth.pretrain.train_per_class=3", "synth.pretrain.val_per_class=1",
    "synth.pretrain.test_per_class=1", "synth.finetune.classes=3", "synth.finetune.clips_per_group=1",
    "cache.short_side=40", "clip.crop_size=32", "clip.frames=8", "split.min_frames=8", "split.probe=false",
    "pretrain.epochs=2", "pretrain.batch_size=4", "pretrain.workers=0",
    "finetune.epochs=2", "finetune.batch_size=4", "finetune.workers=0",
    "evaluate.batch_size=8", "evaluate.workers=0",
]


def write_tiny_params(folder: Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """params.yaml of the project with the TINY overrides (then `overrides`) applied (comments dropped, keys kept)."""
    import yaml

    from action3d.config import apply_override

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in [*TINY, *overrides]:
        apply_override(raw, override)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_project_repo(folder: Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """A fresh git + DVC repository holding the project as users clone it (dvc.yaml, the package's sources, flows,
    prefect.yaml) with the tiny params (and `overrides`), committed on branch main. Returns `folder`."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("dvc.yaml", "README.md", "prefect.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, folder / name)
    for name in ("src", "flows"):
        shutil.copytree(ROOT / name, folder / name, ignore=ignore)
    write_tiny_params(folder, overrides)
    dvc = str(Path(sys.executable).parent / "dvc")
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "ci@example.com"],
                 ["git", "config", "user.name", "ci"], [dvc, "init", "-q"], [dvc, "config", "core.analytics", "false"],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "the project, tiny params"]):
        subprocess.run(argv, cwd=folder, check=True, capture_output=True)
    return folder


@pytest.fixture(scope="session")
def tiny_params():
    return load_params(ROOT / "params.yaml", TINY)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_params) -> Path:
    """synth -> split -> cache for both sets, through the stage functions; returns the folder holding data/."""
    from action3d.stages import cache, split, synth

    root = tmp_path_factory.mktemp("pipeline")
    synth.run(tiny_params, out_dir=root / "data/raw", workers=2)
    for role in ("pretrain", "finetune"):
        split.run(tiny_params, role=role, data_root=root / f"data/raw/{role}", out_dir=root / f"data/splits/{role}")
        cache.run(tiny_params, manifests_dir=root / f"data/splits/{role}", data_root=root / f"data/raw/{role}",
                  out_dir=root / f"data/cache/{role}", workers=2)
    return root


@pytest.fixture
def workdir(tmp_path, tiny_data, monkeypatch) -> Path:
    """A project folder (with .dvc, so the MLflow store lands in it) whose data/ is the session's tiny data."""
    (tmp_path / ".dvc").mkdir()
    shutil.copytree(tiny_data / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
