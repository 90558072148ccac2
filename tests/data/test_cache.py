"""The sharded frame cache: faithful frames, a few files per set, slices that many machines build alike, resumable
builds, a changed video that changes one shard, corrupt inputs skipped and named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from action3d.data import cache as cache_module
from action3d.data.annotations import build_manifests, read_slice
from action3d.data.cache import (
    CacheError,
    FramePack,
    build_cache,
    build_slice,
    decode_scaled,
    manifest_paths,
    open_pack,
    read_index,
    scaled_size,
    shard_count,
    slice_of,
)

pytestmark = pytest.mark.slow  # real videos, encoded by the session fixtures

FAST = dict(workers=1, progress=False)
SMALL_SHARDS = dict(short_side=24, shard_mb=0.02)  # ~20 KB shards: several for the tiny set's 18 videos


@pytest.fixture(scope="module")
def manifests(ucf_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("splits")
    build_manifests("ucf101", ucf_root, out, val_fraction=0.0, **FAST)
    return out


def _files(root: Path) -> dict[str, str]:
    """Every file under `root` (not the scratch folders) -> md5 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and ".build" not in p.as_posix()}


def test_scaled_size_keeps_the_aspect_ratio():
    assert scaled_size(240, 320, 128) == (128, 171)
    assert scaled_size(320, 240, 64) == (85, 64)


def test_shards_are_a_power_of_two_near_the_size_asked_for():
    mb = 2**20
    assert [shard_count(n * mb, 256) for n in (0, 1, 256, 257, 700, 1100)] == [1, 1, 1, 2, 4, 8]


def test_a_pack_in_its_shard_decodes_to_the_scaled_frames(ucf_root, manifests, tmp_path):
    report = build_cache(manifests, ucf_root, tmp_path, short_side=32, min_frames=16, **FAST)
    assert report.built == report.videos == 18 and not report.failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slice-0"]
    index = read_index(tmp_path)
    path = next(iter(index))
    pack = open_pack(tmp_path, index[path])
    assert (pack.info.frames, pack.info.height, pack.info.width, pack.info.fps) == (30, 32, 43, 25.0)
    assert index[path].fingerprint == pack.source.hex() and index[path].bytes == pack.size
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


def test_many_videos_per_file(ucf_root, manifests, tmp_path):
    report = build_cache(manifests, ucf_root, tmp_path, **SMALL_SHARDS, **FAST)
    files = _files(tmp_path)
    shards = [f for f in files if f.endswith(".a3d")]
    assert 1 < len(shards) == report.shards < report.videos  # a few files, not one per video
    index = read_index(tmp_path)
    assert {e.shard for e in index.values()} == set(shards)
    for entry in index.values():  # every video is where its index row says, whole
        assert open_pack(tmp_path, entry).read([0]).shape[0] == 1
    assert sum(e.bytes for e in index.values()) == sum((tmp_path / s).stat().st_size for s in shards)


def test_slices_are_disjoint_complete_and_built_alike_anywhere(ucf_root, manifests, tmp_path):
    """Two slices: every video in exactly one, by a hash of its path; a slice built alone (as one machine of two
    builds it) is byte for byte the slice of the one-machine build."""
    whole = build_cache(manifests, ucf_root, tmp_path / "one", slices=2, **SMALL_SHARDS, **FAST)
    rels = manifest_paths(manifests)
    parts = [{r for r in rels if slice_of(r, 2) == k} for k in (0, 1)]
    assert parts[0] and parts[1] and not parts[0] & parts[1] and parts[0] | parts[1] == set(rels)
    for k in (0, 1):
        index = read_index(tmp_path / "one" / f"slice-{k}")
        assert set(index) == parts[k]
        build_slice(sorted(parts[k]), ucf_root, tmp_path / "apart" / f"slice-{k}", slices=2, **SMALL_SHARDS,
                    workers=2, progress=False)
    assert _files(tmp_path / "apart") == _files(tmp_path / "one")
    assert len(read_index(tmp_path / "one")) == whole.videos == len(rels)


def test_a_changed_video_changes_the_bytes_of_its_shard_alone(ucf_root, copy_of, tmp_path, tiny_video):
    root = copy_of(ucf_root)
    build_manifests("ucf101", root, tmp_path / "splits", val_fraction=0.0, probe=False, **FAST)
    build_cache(tmp_path / "splits", root, tmp_path / "cache", **SMALL_SHARDS, **FAST)
    before, index = _files(tmp_path / "cache"), read_index(tmp_path / "cache")
    changed = sorted(index)[3]
    tiny_video(root / changed, frames=30, seed=9)  # same path, new content (a re-generated data set)
    build_cache(tmp_path / "splits", root, tmp_path / "cache", **SMALL_SHARDS, **FAST)
    after = _files(tmp_path / "cache")
    assert set(after) == set(before)  # the same shards
    differ = {f for f in before if before[f] != after[f]}
    assert {f for f in differ if f.endswith(".a3d")} == {index[changed].shard}  # DVC stores and pushes one file
    assert read_index(tmp_path / "cache")[changed].fingerprint != index[changed].fingerprint


def test_a_build_killed_part_way_resumes_and_gives_the_same_bytes(ucf_root, manifests, tmp_path, monkeypatch):
    reference = build_cache(manifests, ucf_root, tmp_path / "ref", **SMALL_SHARDS, **FAST)
    expected = _files(tmp_path / "ref")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after every video was packed, before the shards were written

    monkeypatch.setattr(cache_module, "_write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        build_cache(manifests, ucf_root, tmp_path / "a", **SMALL_SHARDS, **FAST)
    monkeypatch.undo()
    scratch = sorted((tmp_path / "a" / ".slice-0.build").glob("*.jpack"))
    assert len(scratch) == reference.videos
    scratch[0].unlink()  # one pack never written, one cut short, a temporary file left behind
    scratch[1].write_bytes(scratch[1].read_bytes()[:-100])
    (scratch[2].parent / ".leftover.jpack.tmp").write_bytes(b"half")
    resumed = build_cache(manifests, ucf_root, tmp_path / "a", **SMALL_SHARDS, **FAST)
    assert (resumed.built, resumed.reused) == (2, reference.videos - 2)
    assert _files(tmp_path / "a") == expected
    assert not (tmp_path / "a" / ".slice-0.build").exists()  # the scratch packs are gone once the shards are written


def test_parallel_build_matches_serial(ucf_root, manifests, tmp_path):
    build_cache(manifests / "test.csv", ucf_root, tmp_path / "serial", **SMALL_SHARDS, **FAST)
    build_cache(manifests / "test.csv", ucf_root, tmp_path / "parallel", **SMALL_SHARDS, workers=2, progress=False)
    assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")


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
    assert not index[train[0]].shard and index[train[2]].shard
    assert train[0] in report.summary()


def test_a_cache_of_one_file_per_video_is_named_with_what_to_do(tmp_path):
    (tmp_path / "index.csv").write_text("path,frames,height,width,fps,bytes,error,truncated\nv.avi,30,24,32,25.0,9,,\n")
    with pytest.raises(CacheError, match=r"one file per video.*delete .* and run `dvc repro`"):
        read_index(tmp_path)


def test_a_file_that_is_not_a_pack_is_named(tmp_path):
    bad = tmp_path / "x.a3d"
    bad.write_bytes(b"something else entirely, long enough to hold a header")
    with pytest.raises(CacheError, match=r"x\.a3d at byte 8: not a frame pack"):
        FramePack(bad, offset=8)


def test_a_truncated_video_is_cached_and_reported(ucf_root, copy_of, tmp_path, tiny_video, capsys):
    """A real H.264 file cut short decodes quietly to fewer frames than its container states: the stage caches the
    frames it has and reports the video in its summary, cache_report.json, index.csv and its metrics."""
    from action3d.config import load_params
    from action3d.stages import cache as cache_stage

    root = copy_of(ucf_root)
    build_manifests("ucf101", root, tmp_path / "splits", val_fraction=0.0, probe=False, **FAST)
    cut = [ln.split()[0] for ln in (root / "trainlist01.txt").read_text().splitlines()][0]
    whole = tiny_video(root / cut, frames=50).read_bytes()
    (root / cut).write_bytes(whole[: int(len(whole) * 0.9)])  # the last tenth of the file is gone
    build_manifests("ucf101", root, tmp_path / "splits", val_fraction=0.0, probe=False, **FAST)  # its new print

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml",
                         ["cache.short_side=24", f"data.finetune.path={root}", "data.finetune.layout=ucf101"])
    args = dict(role="finetune", videos=tmp_path / "splits/slices/0.csv", out=tmp_path / "cache/slice-0")
    assert cut in read_slice(args["videos"])
    metrics = cache_stage.run(params, **args)
    assert metrics["truncated"] == 1 and metrics["unreadable"] == 0 and metrics["built"] == metrics["videos"]
    entry = read_index(tmp_path / "cache")[cut]
    assert 0 < entry.frames < 50 and open_pack(tmp_path / "cache", entry).frames == entry.frames
    why = f"decoded {entry.frames} frames, container says 50"
    assert f"truncated, cached the frames decoded: {cut} ({why})" in capsys.readouterr().out
    assert json.loads((tmp_path / "cache/slice-0/cache_report.json").read_text())["truncated"] == {cut: why}
    assert entry.truncated == why
