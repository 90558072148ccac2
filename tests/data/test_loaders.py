"""Loaders over the cache: shapes, labels, clips per video, temporal random crop, randomness that depends on (seed,
epoch, video) alone, epoch length, time shuffle, bad videos, sharding."""

from __future__ import annotations

import csv
from fractions import Fraction

import numpy as np
import pytest
import torch
from pytorchvideo.data.clip_sampling import RandomClipSampler

from action3d.data.annotations import build_manifests, read_manifest
from action3d.data.cache import build_cache, read_index
from action3d.data.loaders import PackedVideo, clip_indices, make_eval_loader, make_train_loader
from action3d.data.transforms import KINETICS_MEAN, KINETICS_STD
from action3d.data.video import write_video

pytestmark = pytest.mark.slow  # real videos, encoded by the session fixtures


FAST = dict(workers=1, progress=False)
CLIP = dict(clip_frames=8, crop_size=16)


@pytest.fixture(scope="module")
def data(ucf_root, tmp_path_factory):
    """Manifests and a 24-pixel cache of the tiny UCF set (30-frame videos): 12 train, 6 test videos."""
    out = tmp_path_factory.mktemp("loaders")
    build_manifests("ucf101", ucf_root, out / "splits", val_fraction=0.0, **FAST)
    build_cache(out / "splits", ucf_root, out / "cache", short_side=24, **FAST)
    return out


def test_clip_indices_loop_pad_short_videos():
    assert clip_indices(4, 4, 1, 30) == [4, 5, 6, 7]
    assert clip_indices(0, 8, 1, 3) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert clip_indices(26, 4, 2, 30) == [26, 28, 26, 28]


def test_train_batches(data):
    loader = make_train_loader(data / "splits" / "train.csv", data / "cache", batch_size=4, workers=0, seed=1, **CLIP)
    rows = read_manifest(data / "splits" / "train.csv")
    assert len(loader) == 12 // 4
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch["video"].shape == (4, 3, 8, 16, 16) and batch["video"].dtype == torch.float32
        assert batch["label"].dtype == torch.int64
        for index, label in zip(batch["video_index"].tolist(), batch["label"].tolist()):
            assert int(rows[index]["label"]) == label
    seen = torch.cat([b["video_index"] for b in batches]).tolist()
    assert sorted(seen) == list(range(12))  # every video once per epoch


@pytest.mark.parametrize("batch_size, sizes", [(5, [5, 5, 2]), (4, [4, 4, 4]), (11, [11])])
def test_an_epoch_is_every_video_once_the_last_batch_partial(data, batch_size, sizes):
    """As the reference trains (a DataLoader with shuffle, drop_last off): ceil(n / batch) steps, every video once;
    only a last batch of a single clip is dropped (12 videos in batches of 11)."""
    loader = make_train_loader(data / "splits" / "train.csv", data / "cache", batch_size=batch_size, workers=0,
                               seed=0, **CLIP)
    batches = list(loader)
    assert [len(b["label"]) for b in batches] == sizes == [len(b["label"]) for b in list(loader)]
    seen = torch.cat([b["video_index"] for b in batches]).tolist()
    assert len(set(seen)) == len(seen) == sum(sizes)


def test_epoch_length_is_exact_with_persistent_workers(data):
    loader = make_train_loader(data / "splits" / "train.csv", data / "cache", batch_size=3, workers=2, seed=0,
                               **CLIP)
    assert loader.persistent_workers
    for _ in range(2):  # two epochs through the same workers
        indices = torch.cat([b["video_index"] for b in loader]).tolist()
        assert sorted(indices) == list(range(12))


def test_train_order_follows_the_seed(data):
    def order(seed):
        loader = make_train_loader(data / "splits" / "train.csv", data / "cache", batch_size=4, workers=0, seed=seed,
                                   **CLIP)
        return torch.cat([b["video_index"] for b in loader]).tolist()

    assert order(3) == order(3) and order(3) != order(4)


def test_eval_takes_every_non_overlapping_window(data):
    loader = make_eval_loader(data / "splits" / "test.csv", data / "cache", batch_size=5, workers=0, **CLIP)
    assert len(loader.dataset) == 6 * (30 // 8)  # 3 windows of 8 frames in each 30-frame video
    batches = list(loader)
    index = torch.cat([b["video_index"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert torch.bincount(index).tolist() == [3] * 6
    for v in range(6):
        assert labels[index == v].unique().numel() == 1
    assert batches[0]["video"].shape == (5, 3, 8, 16, 16)


def test_a_video_shorter_than_a_clip_gives_one_padded_clip(data, tmp_path):
    rows = read_manifest(data / "splits" / "test.csv")
    manifest = tmp_path / "one.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow(rows[0])
    loader = make_eval_loader(manifest, data / "cache", clip_frames=40, crop_size=16, batch_size=4, workers=0)
    (batch,) = list(loader)
    assert batch["video"].shape == (1, 3, 40, 16, 16)
    assert torch.equal(batch["video"][0, :, 30:], batch["video"][0, :, :10])  # looped from the start


def test_time_shuffle_keeps_the_frames_and_changes_their_order(data):
    args = dict(batch_size=18, workers=0, **CLIP)
    plain = next(iter(make_eval_loader(data / "splits" / "test.csv", data / "cache", **args)))["video"]
    shuffled = lambda: next(iter(make_eval_loader(  # noqa: E731
        data / "splits" / "test.csv", data / "cache", time_shuffle=True, **args)))["video"]
    mixed, again = shuffled(), shuffled()
    assert torch.equal(mixed, again)  # a fixed permutation per clip
    assert not torch.equal(plain, mixed)
    assert torch.allclose(plain.sort(dim=2).values, mixed.sort(dim=2).values)  # same frames, other order


def test_a_bad_video_mid_epoch_is_skipped_and_counted(data, tmp_path, caplog):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(data / "cache", cache)
    rows = read_manifest(data / "splits" / "train.csv")
    loader = make_train_loader(data / "splits" / "train.csv", cache, batch_size=4, workers=2, seed=0, **CLIP)
    entry = read_index(cache)[rows[5]["path"]]
    with open(cache / entry.shard, "r+b") as shard:  # its frames damaged in its shard after the loader was built
        shard.seek(entry.offset + entry.bytes // 2)
        shard.write(b"\0" * (entry.bytes // 2))
    seen = torch.cat([b["video_index"] for b in loader]).tolist()
    assert sorted(seen) == [i for i in range(12) if i != 5]
    assert loader.skipped_videos == 1
    seen = torch.cat([b["video_index"] for b in loader]).tolist()  # the count is per pass
    assert loader.skipped_videos == 1 and len(seen) == 11


def test_videos_missing_from_the_cache_are_left_out(data, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(data / "cache", cache)
    rows = read_manifest(data / "splits" / "test.csv")
    index = cache / "slice-0" / "index.csv"
    index.write_text("".join(line for line in index.read_text().splitlines(keepends=True)
                             if not line.startswith(rows[0]["path"] + ",")))  # a video the cache does not hold
    loader = make_eval_loader(data / "splits" / "test.csv", cache, batch_size=4, workers=0, **CLIP)
    assert {r.index for r in loader.dataset.records} == set(range(1, 6))


def test_sharding_for_ddp(data):
    evals = [make_eval_loader(data / "splits" / "test.csv", data / "cache", batch_size=4, workers=0, world_size=2,
                              rank=r, **CLIP) for r in (0, 1)]
    shards = [list(e.sampler) for e in evals]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(18))  # no padding
    assert [sum(len(b["label"]) for b in e) for e in evals] == [9, 9]
    train = [make_train_loader(data / "splits" / "train.csv", data / "cache", batch_size=2, workers=0, world_size=2,
                               rank=r, **CLIP) for r in (0, 1)]
    assert all(len(t.sampler) == 6 for t in train)
    for epoch in (1, 2):  # both ranks shuffle alike each epoch, so their shards still partition the videos
        for t in train:
            t.sampler.set_epoch(epoch)
        parts = [{key.index for key in t.sampler} for t in train]
        assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(12))
        for t in train:
            t.sampler.set_epoch(epoch)
        batches = [list(t) for t in train]
        assert [sum(len(b["label"]) for b in bs) for bs in batches] == [6, 6]
        seen = [set(torch.cat([b["video_index"] for b in bs]).tolist()) for bs in batches]
        assert not seen[0] & seen[1]


def test_packed_video_speaks_pytorchvideo(data):
    rows = read_manifest(data / "splits" / "test.csv")
    entry = read_index(data / "cache")[rows[0]["path"]]
    video = PackedVideo(data / "cache" / entry.shard, offset=entry.offset, length=entry.bytes)
    assert video.duration == Fraction(30, 25)
    clip = video.get_clip(Fraction(4, 25), Fraction(12, 25))["video"]
    assert clip.shape == (3, 8, 24, 32) and clip.dtype == torch.uint8
    info = RandomClipSampler(Fraction(8, 25))(0, video.duration, {})
    assert 0 <= info.clip_start_sec <= video.duration - Fraction(8, 25)
    assert torch.equal(video.get_clip(0, Fraction(2, 25))["video"].transpose(0, 1), video.frames([0, 1]))


# --- the temporal random crop, on a video whose frame t shows the grey level 10 + 6 t --------------------------


def _numbered_video_cache(tmp_path, frames: int = 40):
    """A one-video manifest and cache of a `frames`-frame video whose frame t is uniformly grey at 10 + 6 t."""
    video = tmp_path / "raw" / "count" / "v.mkv"
    write_video(video, (np.full((48, 64, 3), 10 + 6 * t, np.uint8) for t in range(frames)), fps=25, crf=10)
    manifest = tmp_path / "one.csv"
    manifest.write_text("path,label,label_name,video_id,group\ncount/v.mkv,0,count,v,v\n")
    build_cache(manifest, tmp_path / "raw", tmp_path / "cache", short_side=24, workers=1, progress=False)
    return manifest, tmp_path / "cache"


def _frame_numbers(clip: torch.Tensor) -> list[int]:
    """The frame number each frame of a normalised clip [3, T, H, W] of the numbered video shows."""
    grey = clip[0].mean(dim=(1, 2)) * 255 * KINETICS_STD[0] + 255 * KINETICS_MEAN[0]
    return [round((float(g) - 10) / 6) for g in grey]


@pytest.mark.parametrize("stride, last_start", [(1, 24), (2, 8)])
def test_training_clips_start_anywhere_in_the_video(tmp_path, stride, last_start):
    """40 frames, 16-frame clips: a clip may start at any frame whose 16 x stride span fits (the reference's
    TemporalRandomCrop), not only at frame 0."""
    manifest, cache = _numbered_video_cache(tmp_path)
    loader = make_train_loader(manifest, cache, clip_frames=16, crop_size=16, stride=stride, batch_size=1, workers=0,
                               seed=0)
    starts = []
    for epoch in range(400):
        loader.sampler.set_epoch(epoch)
        (batch,) = list(loader)
        numbers = _frame_numbers(batch["video"][0])
        assert numbers == list(range(numbers[0], numbers[0] + 16 * stride, stride))  # consecutive, stride apart
        starts.append(numbers[0])
    assert set(starts) == set(range(last_start + 1))


def test_a_video_shorter_than_a_training_clip_starts_at_0_and_loops(tmp_path):
    manifest, cache = _numbered_video_cache(tmp_path, frames=10)
    loader = make_train_loader(manifest, cache, clip_frames=16, crop_size=16, batch_size=1, workers=0, seed=0)
    for epoch in range(5):
        loader.sampler.set_epoch(epoch)
        (batch,) = list(loader)
        assert _frame_numbers(batch["video"][0]) == [t % 10 for t in range(16)]


# --- training randomness: a function of (seed, epoch, video), not of workers or resumption -------------------------


def _epochs(data, epochs, *, workers, seed=0, first=1):
    loader = make_train_loader(data / "splits" / "train.csv", data / "cache", batch_size=4, workers=workers, seed=seed,
                               **CLIP)
    out = []
    for epoch in range(first, first + epochs):
        loader.sampler.set_epoch(epoch)
        out.append([(b["video_index"], b["video"]) for b in loader])
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_training_batches_do_not_depend_on_workers_or_on_resuming(data):
    alone = _epochs(data, 3, workers=0)
    persistent = _epochs(data, 3, workers=2)
    resumed = _epochs(data, 1, workers=2, first=3)  # new workers, straight into epoch 3
    assert all(_same(a, p) for a, p in zip(alone, persistent))
    assert _same(resumed[0], alone[2])
    assert not _same(alone[0], alone[1])  # each epoch draws anew
    assert not _same(_epochs(data, 1, workers=0, seed=1)[0], alone[0])


def test_without_set_epoch_each_pass_is_the_next_epoch(data):
    loader = make_train_loader(data / "splits" / "train.csv", data / "cache", batch_size=4, workers=0, seed=0, **CLIP)
    plain = [[(b["video_index"], b["video"]) for b in loader] for _ in range(2)]
    assert _same(plain[0], _epochs(data, 1, workers=0, first=0)[0])
    assert _same(plain[1], _epochs(data, 1, workers=0, first=1)[0])
