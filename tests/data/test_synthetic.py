"""The demo generator: official layouts, determinism, and the motion-only design of its classes."""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from action3d.data.synthetic import (
    FINETUNE_CLASSES,
    PRETRAIN_CLASSES,
    Stage,
    _rhythm,
    synth_kinetics,
    synth_ucf101,
)
from action3d.data.video import probe_video, read_frames

pytestmark = pytest.mark.slow  # real videos, encoded by the session fixtures


TINY = dict(width=64, height=48, fps=25, seconds=1.2, workers=1, progress=False)


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_ucf_layout_matches_the_official_files(ucf_root):
    classes = (ucf_root / "classInd.txt").read_bytes().decode()
    assert classes.splitlines() == [f"{i} {n}" for i, n in enumerate(list(FINETUNE_CLASSES)[:3], 1)]
    assert "\r\n" in classes  # the official files have CRLF line ends
    for split in (1, 2, 3):
        train = (ucf_root / f"trainlist{split:02d}.txt").read_text().split()
        test = (ucf_root / f"testlist{split:02d}.txt").read_text().split()
        train_paths = train[0::2]
        assert all(re.fullmatch(r"(\w+)/v_\1_g\d\d_c\d\d\.avi", p) for p in train_paths + test)
        assert {int(x) for x in train[1::2]} == {1, 2, 3}
        group = lambda p: p.rsplit("_c", 1)[0]  # noqa: E731
        assert not {group(p) for p in train_paths} & {group(p) for p in test}, "train and test groups must be apart"
        assert all((ucf_root / p).is_file() for p in train_paths + test)
    first = ucf_root / test[0]
    frames, fps = read_frames(first)
    assert frames.shape == (30, 48, 64, 3) and fps == 25


def test_kinetics_layout_and_paths(kinetics_root):
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        with open(kinetics_root / f"kinetics_{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["label", "youtube_id", "time_start", "time_end", "split"]
        assert len(rows) == 3 * per_class
        for row in rows:
            assert len(row["youtube_id"]) == 11 and row["split"] == split
            stem = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}"
            rel = f"{split}/{row['label']}/{stem}.mp4"
            assert probe_video(kinetics_root / rel).ok


def test_hmdb_split_files(hmdb_root):
    files = sorted((hmdb_root / "splits").glob("*_test_split1.txt"))
    assert len(files) == 3
    flags = [line.split()[1] for line in files[0].read_text().splitlines()]
    assert sorted(set(flags)) == ["0", "1", "2"]  # unused, train and test all present with 5 groups


def test_same_seed_same_bytes_other_seed_other_video(tmp_path):
    args = dict(classes=2, groups=2, clips_per_group=1, **TINY)
    synth_ucf101(tmp_path / "a", seed=7, **args)
    synth_ucf101(tmp_path / "b", seed=7, **args)
    synth_ucf101(tmp_path / "c", seed=8, **args)
    rel = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.avi"))
    assert len(rel) == 4
    assert all(_md5(tmp_path / "a" / r) == _md5(tmp_path / "b" / r) for r in rel)
    assert _md5(tmp_path / "a" / rel[0]) != _md5(tmp_path / "c" / rel[0])


def test_same_bytes_whatever_the_heap_holds(tmp_path):
    # x264's AVX-512 macroblock-tree code read stale heap memory, so the bytes depended on what the process had
    # allocated before. glibc's MALLOC_PERTURB_ fills new allocations with the given byte: each run sees other
    # garbage (elsewhere the variable is ignored and the runs agree trivially).
    script = ("import sys; from action3d.data.synthetic import synth_ucf101; synth_ucf101(sys.argv[1], classes=2, "
              "groups=2, clips_per_group=1, seed=7, width=64, height=48, fps=25, seconds=1.2, workers=1, "
              "progress=False)")
    for name, perturb in (("a", "0"), ("b", "165"), ("c", "90")):
        env = {**os.environ, "MALLOC_PERTURB_": perturb}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], env=env, check=True, timeout=300)
    rel = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.avi"))
    assert len(rel) == 4
    for other in ("b", "c"):
        assert [_md5(tmp_path / "a" / r) for r in rel] == [_md5(tmp_path / other / r) for r in rel], other


def test_no_fine_tuning_scene_is_ever_shown_in_pretraining(tmp_path):
    """A clean transfer test: the pretraining set draws its scenes from a bank the fine-tuning set never uses, and
    each fine-tuning group has a scene of its own. Seen in the pixels: a video's background (the median of its
    frames: the sprites move, the scene stays) is far closer to its sibling clip's than to any pretraining
    video's, or any other group's."""
    pre = synth_kinetics(tmp_path / "k", classes=2, train_per_class=4, val_per_class=1, test_per_class=1, looks=3,
                         **TINY)
    fine = synth_ucf101(tmp_path / "u", classes=2, groups=4, clips_per_group=2, test_groups=2, **TINY)
    assert not set(pre["scenes"].values()) & set(fine["scenes"].values())
    assert len(set(pre["scenes"].values())) == 3 and len(set(fine["scenes"].values())) == 4  # one per group
    assert fine["test_groups"] == [[1, 2], [3, 4], [1, 2]]

    def background(path):
        return np.median(read_frames(path)[0].astype(np.float32), axis=0)

    pretraining = [background(tmp_path / "k" / rel) for rel in pre["scenes"]]
    fine_tuning = {rel: (scene, background(tmp_path / "u" / rel)) for rel, scene in fine["scenes"].items()}
    for rel, (scene, image) in fine_tuning.items():
        sibling = max(np.abs(image - other).mean() for r, (s, other) in fine_tuning.items() if s == scene and r != rel)
        nearest_pretraining = min(np.abs(image - other).mean() for other in pretraining)
        nearest_group = min(np.abs(image - other).mean() for s, other in fine_tuning.values() if s != scene)
        assert nearest_pretraining > 1.5 * sibling and nearest_group > 1.5 * sibling, rel


def test_regenerating_replaces_only_its_own_folder(tmp_path):
    synth_kinetics(tmp_path / "k", classes=2, train_per_class=1, val_per_class=0, test_per_class=0, **TINY)
    synth_kinetics(tmp_path / "k", classes=3, train_per_class=1, val_per_class=0, test_per_class=0, **TINY)
    assert len(list((tmp_path / "k" / "train").iterdir())) == 3  # the old set was replaced, not merged
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not written by the synthesizer"):
        synth_kinetics(tmp_path / "mine", classes=2, train_per_class=1, **TINY)
    assert (tmp_path / "mine" / "precious.txt").exists()


def test_bad_knobs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="between 2 and"):
        synth_ucf101(tmp_path / "u", classes=len(FINETUNE_CLASSES) + 1, **TINY)
    with pytest.raises(ValueError, match="even"):
        synth_ucf101(tmp_path / "u", classes=2, **{**TINY, "width": 63})
    with pytest.raises(ValueError, match="test_groups must be between 1 and groups - 1"):
        synth_ucf101(tmp_path / "u", classes=2, groups=4, test_groups=4, **TINY)


@pytest.mark.parametrize("name", list(PRETRAIN_CLASSES) + list(FINETUNE_CLASSES))
def test_every_program_moves_its_sprites_inside_the_frame(name):
    table = {**PRETRAIN_CLASSES, **FINETUNE_CLASSES}
    stage = Stage(320, 240, 60)
    tracks = table[name](np.random.default_rng(0), stage)
    assert tracks
    for tr in tracks:
        assert all(len(a) == 60 and np.isfinite(a).all() for a in (tr.x, tr.y, tr.angle, tr.scale))
        assert tr.x.min() > -20 and tr.x.max() < 340 and tr.y.min() > -20 and tr.y.max() < 260
    change = sum(np.abs(np.diff(tr.x)).sum() + np.abs(np.diff(tr.y)).sum() + 50 * np.abs(np.diff(tr.angle)).sum()
                 + 100 * np.abs(np.diff(tr.scale)).sum() for tr in tracks)
    assert change > 20, f"{name} hardly moves"


@pytest.mark.parametrize("rhythm", ["slow", "fast", "stopgo", "ratchet", "swing", "spinup"])
def test_every_wheel_rhythm_covers_a_full_period_in_any_16_frames(rhythm):
    # the design that makes shuffled frames uninformative: every class shows the wheel at every phase
    for seed in range(20):
        turn = np.cumsum(_rhythm(rhythm, np.random.default_rng(seed), 60))
        for start in range(0, 60 - 16 + 1):
            window = turn[start:start + 16]
            assert window.max() - window.min() >= 1.0 - 1e-9, (rhythm, seed, start)
    if rhythm != "swing":  # a directed rhythm never turns half a period or more in one frame (no aliasing)
        assert np.abs(_rhythm(rhythm, np.random.default_rng(0), 60)).max() < 0.5


def test_clockwise_and_counterclockwise_wheels_mirror_each_other():
    stage = Stage(320, 240, 60)
    spokes = FINETUNE_CLASSES["SlowTurnClockwise"](np.random.default_rng(3), stage)
    cw = spokes[0]
    ccw = FINETUNE_CLASSES["SlowTurnCounterclockwise"](np.random.default_rng(3), stage)[0]
    hub = np.mean([t.x for t in spokes], axis=0), np.mean([t.y for t in spokes], axis=0)
    # screen coordinates (y down): turning clockwise on screen makes the angle about the hub grow
    phi = np.unwrap(np.arctan2(cw.y - hub[1], cw.x - hub[0]))
    assert phi[-1] - phi[0] > 0
    assert math.isclose(float(np.diff(cw.angle).mean()), -float(np.diff(ccw.angle).mean()), rel_tol=1e-6)


@pytest.mark.parametrize("sense", ["clockwise", "counterclockwise"])
def test_pretraining_rings_turn_their_way_and_show_it_without_order(sense):
    # the pretraining counterpart of the wheel: its sprites differ, so the sense shows in any two frames
    for suffix in ("", " in bursts", " with backsteps", " speeding up"):
        tracks = PRETRAIN_CLASSES[f"orbit {sense}{suffix}"](np.random.default_rng(5), Stage(320, 240, 60))
        assert 2 <= len(tracks) <= 3 and {t.sprite for t in tracks} == {0, 1}
        hub = np.mean([t.x for t in tracks], axis=0), np.mean([t.y for t in tracks], axis=0)
        phi = np.unwrap(np.arctan2(tracks[0].y - hub[1], tracks[0].x - hub[0]))
        assert (phi[-1] - phi[0] > 0) == (sense == "clockwise"), suffix


def test_fine_tuning_names_are_not_pretraining_names():
    squash = lambda n: n.replace(" ", "").lower()  # noqa: E731
    assert not {squash(n) for n in FINETUNE_CLASSES} & {squash(n) for n in PRETRAIN_CLASSES}
