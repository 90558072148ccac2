"""Tiny real datasets for the data tests: 64x48 H.264 videos written by the synthesizer in the official layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from action3d.data.synthetic import synth_hmdb51, synth_kinetics, synth_ucf101
from tests.helpers import write_video

TINY = dict(width=64, height=48, fps=25, seconds=1.2, workers=1, progress=False)  # 30 frames per video


@pytest.fixture(scope="session")
def ucf_root(tmp_path_factory) -> Path:
    """UCF-101 layout: 3 classes x 3 groups x 2 clips (split s tests group s)."""
    root = tmp_path_factory.mktemp("ucf") / "ucf101"
    synth_ucf101(root, classes=3, groups=3, clips_per_group=2, seed=1, **TINY)
    return root


@pytest.fixture(scope="session")
def hmdb_root(tmp_path_factory) -> Path:
    """HMDB-51 layout: 3 actions x 5 source videos x 1 clip (one group per split flagged 0)."""
    root = tmp_path_factory.mktemp("hmdb") / "hmdb51"
    synth_hmdb51(root, classes=3, groups=5, clips_per_group=1, seed=2, **TINY)
    return root


@pytest.fixture(scope="session")
def kinetics_root(tmp_path_factory) -> Path:
    """Kinetics layout: 3 classes x (2 train, 1 val, 1 test)."""
    root = tmp_path_factory.mktemp("kin") / "kinetics"
    synth_kinetics(root, classes=3, train_per_class=2, val_per_class=1, test_per_class=1, seed=3, **TINY)
    return root


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(root) -> a private copy a test may damage."""

    def make(root: Path) -> Path:
        dest = tmp_path / root.name
        shutil.copytree(root, dest)
        return dest

    return make


@pytest.fixture
def tiny_video():
    """tiny_video(path, frames=30) writes a real 64x48 H.264 file of a drifting noise pattern."""
    return write_video
