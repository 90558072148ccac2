"""The frame-pack cache: faithful frames, resumable builds, corrupt inputs skipped and named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from action3d.data.annotations import build_manifests
from action3d.data.cache import (

    CacheError,
    FramePack,
    build_cache,
    cache_path,
    decode_scaled,
    read_index,
    scaled_size,
)

pytestmark = pytest.mark.slow  # real videos, encoded by the session fixtures

FAST = dict(workers=1, progress=False)


@pytest.fixture(scope="module")
def manifests(ucf_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("splits")
    build_manifests("ucf101", ucf_root, out, val_fraction=0.0, **FAST)
    return out


def test_scaled_size_keeps_the_aspect_ratio():
    assert scaled_size(240, 320, 128) == (128, 171)
    assert scaled_size(320, 240, 64) == (85, 64)


def test_pack_decodes_to_the_scaled_frames(ucf_root, manifests, tmp_path):
    report = build_cache(manifests, ucf_root, tmp_path, short_side=32, min_frames=16, **FAST)
    assert report.built == report.videos == 18 and not report.failed
    rel = read_index(tmp_path)
    path = next(iter(rel))
    pack = FramePack(cache_path(tmp_path, path))
    assert (pack.info.frames, pack.info.height, pack.info.width, pack.info.fps) == (30, 32, 43, 25.0)
    source, _, truncated = decode_scaled(ucf_root / path, 32)
    assert truncated == ""
    frames = pack.read(range(30)).permute(0, 2, 3, 1).numpy().astype(np.int16)
    assert frames.shape == source.shape
    assert np.abs(frames - source).mean() < 4  # JPEG at quality 90
    # any order, repeats: each index gets its own frame
    again = pack.read([5, 2, 5, 29])
    assert torch.equal(again[0], again[2]) and torch.equal(again[1], pack.read([2])[0])
    with pytest.raises(IndexError, match="outside 0..29"):
        pack.read([30])


def test_a_second_run_resumes_and_gives_the_same_bytes(ucf_root, manifests, tmp_path):
    first = build_cache(manifests, ucf_root, tmp_path / "a", short_side=24, **FAST)
    packs = sorted((tmp_path / "a").rglob("*.jpack"))
    reference = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in packs}
    # an interrupted run: two packs never written, one cut short, a temporary file left behind
    packs[0].unlink()
    packs[1].unlink()
    packs[2].write_bytes(packs[2].read_bytes()[:-100])
    (packs[3].parent / ".leftover.tmp.jpack").write_bytes(b"half")
    second = build_cache(manifests, ucf_root, tmp_path / "a", short_side=24, **FAST)
    assert (second.built, second.reused) == (3, first.videos - 3)
    assert {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*.jpack")
            if not p.name.startswith(".")} == reference
    third = build_cache(manifests, ucf_root, tmp_path / "a", short_side=16, **FAST)  # another resolution: rebuilt
    assert third.built == first.videos


def test_a_changed_source_video_is_rebuilt(ucf_root, copy_of, tmp_path, tiny_video):
    root = copy_of(ucf_root)
    build_manifests("ucf101", root, tmp_path / "splits", val_fraction=0.0, probe=False, **FAST)
    build_cache(tmp_path / "splits", root, tmp_path / "cache", short_side=24, **FAST)
    rel = read_index(tmp_path / "cache")
    changed = next(iter(rel))
    tiny_video(root / changed, frames=12, seed=9)  # same path, new content (a re-generated data set)
    report = build_cache(tmp_path / "splits", root, tmp_path / "cache", short_side=24, **FAST)
    assert (report.built, report.reused) == (1, report.videos - 1)
    assert FramePack(cache_path(tmp_path / "cache", changed)).frames == 12


def test_parallel_build_matches_serial(ucf_root, manifests, tmp_path):
    build_cache(manifests / "test.csv", ucf_root, tmp_path / "serial", short_side=24, **FAST)
    build_cache(manifests / "test.csv", ucf_root, tmp_path / "parallel", short_side=24, workers=2, progress=False)
    serial = sorted((tmp_path / "serial").rglob("*.jpack"))
    assert serial and all(p.read_bytes() == (tmp_path / "parallel" / p.relative_to(tmp_path / "serial")).read_bytes()
                          for p in serial)


def test_corrupt_inputs_are_recorded_and_skipped(ucf_root, copy_of, tmp_path):
    root = copy_of(ucf_root)
    build_manifests("ucf101", root, tmp_path / "splits", val_fraction=0.0, probe=False, **FAST)
    train = [ln.split()[0] for ln in (root / "trainlist01.txt").read_text().splitlines()]
    (root / train[0]).write_bytes(b"")
    (root / train[1]).write_bytes(b"\x00not a video" * 50)
    report = build_cache(tmp_path / "splits", root, tmp_path / "cache", short_side=24, **FAST)
    assert set(report.failed) == {train[0], train[1]}
    assert report.built == report.videos - 2
    index = read_index(tmp_path / "cache")
    assert index[train[0]].error and index[train[1]].error and not index[train[2]].error
    assert train[0] in report.summary()
    assert not cache_path(tmp_path / "cache", train[0]).exists()


def test_a_file_that_is_not_a_pack_is_named(tmp_path):
    bad = tmp_path / "x.jpack"
    bad.write_bytes(b"something else entirely")
    with pytest.raises(CacheError, match=r"x\.jpack: not a frame pack"):
        FramePack(bad)


def test_a_truncated_video_is_cached_and_reported(ucf_root, copy_of, tmp_path, tiny_video, capsys):
    """A real H.264 file cut short decodes quietly to fewer frames than its container states: the stage caches the
    frames it has and reports the video in its summary, cache_report.json, index.csv and its metrics."""
    import json
    from pathlib import Path

    from action3d.config import load_params
    from action3d.stages import cache as cache_stage

    root = copy_of(ucf_root)
    build_manifests("ucf101", root, tmp_path / "splits", val_fraction=0.0, probe=False, **FAST)
    cut = [ln.split()[0] for ln in (root / "trainlist01.txt").read_text().splitlines()][0]
    whole = tiny_video(root / cut, frames=50).read_bytes()
    (root / cut).write_bytes(whole[: int(len(whole) * 0.9)])  # the last tenth of the file is gone

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml",
                         ["cache.short_side=24", f"data.finetune.path={root}", "data.finetune.layout=ucf101"])
    args = dict(role="finetune", manifests=tmp_path / "splits", out=tmp_path / "cache")
    metrics = cache_stage.run(params, **args)
    assert metrics["truncated"] == 1 and metrics["unreadable"] == 0 and metrics["built"] == metrics["videos"]
    frames = read_index(tmp_path / "cache")[cut].frames
    assert 0 < frames < 50 and FramePack(cache_path(tmp_path / "cache", cut)).frames == frames
    why = f"decoded {frames} frames, container says 50"
    assert f"truncated, cached the frames decoded: {cut} ({why})" in capsys.readouterr().out
    assert json.loads((tmp_path / "cache" / "cache_report.json").read_text())["truncated"] == {cut: why}
    assert read_index(tmp_path / "cache")[cut].truncated == why

    again = cache_stage.run(params, **args)  # resumed: nothing rebuilt, the video still reported
    assert (again["built"], again["truncated"]) == (0, 1)
    assert json.loads((tmp_path / "cache" / "cache_report.json").read_text())["truncated"] == {cut: why}
