"""Clip datasets and DataLoaders over the frame-pack cache, with pytorchvideo's clip samplers.

Training: one random T-frame clip per video per epoch, its first frame drawn uniformly over the whole video (the
reference's TemporalRandomCrop; loop-padded when the video is shorter), with the paper's augmentation
(`TrainPreset`). Evaluation: every non-overlapping T-frame window of every video (pytorchvideo
`UniformClipSampler`, the paper's video-level test), each tagged with its video index.

Training randomness is a pure function of (seed, epoch, video): `EpochSampler` shuffles from (seed, epoch) in the
main process and hands each item its epoch along with its index, and the item draws its clip start, crop and flip
from a generator seeded by (seed, epoch, index). So an epoch's batches do not depend on the number of workers, on
their persistence, nor on where a run was stopped and resumed; nothing random happens in the workers' own RNGs.

The datasets are map-style (`len` = videos for training, clips for evaluation) so the epoch length is exact with any
number of workers, which pytorchvideo's iterable LabeledVideoDataset gets wrong (pytorchvideo#102).

Batches: {"video": float [B, 3, T, H, W], "label": int64 [B], "video_index": int64 [B]} and, in training, "weight"
float [B] (0 for a filler that evens out the ranks' shares under DDP; see `EpochSampler`) (video_index = the row of
the video in its manifest).

A video that fails to decode mid-epoch does not stop training: its clip is dropped from the batch, a warning names
it, and a counter shared by all worker processes counts it. `loader.skipped_videos` (also on the dataset) is the
number dropped since the loader's current pass began, which the engine reports at the end of the epoch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from pytorchvideo.data.clip_sampling import UniformClipSampler
from pytorchvideo.data.video import Video
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from action3d.data.annotations import AnnotationError, read_manifest
from action3d.data.cache import CacheError, FramePack, read_index
from action3d.data.transforms import EvalPreset, TrainPreset
from action3d.distributed import ShardSampler, get_rank, get_world_size

log = logging.getLogger(__name__)


class PackedVideo(Video):
    """pytorchvideo's `Video` interface over one frame pack (in its shard, at `offset`), so its clip samplers and
    tools apply unchanged.

    `get_clip(start_sec, end_sec)` returns {"video": uint8 [3, T, H, W], "audio": None} for the frames whose
    timestamps fall in [start_sec, end_sec). `frames(indices)` is the frame-exact access the datasets use.
    """

    def __init__(self, path: str | Path, video_name: str | None = None, decode_audio: bool = False, *,
                 offset: int = 0, length: int | None = None):
        self._pack = FramePack(path, offset, length)
        self._name = video_name or Path(path).name

    @property
    def name(self) -> str:
        return self._name

    @property
    def fps(self) -> float:
        return self._pack.info.fps

    @property
    def num_frames(self) -> int:
        return self._pack.frames

    @property
    def duration(self) -> Fraction:
        return Fraction(self._pack.frames) / Fraction(self._pack.info.fps).limit_denominator(1001)

    def frames(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 [T, 3, H, W] for the given frame indices."""
        return self._pack.read(indices)

    def get_clip(self, start_sec: float, end_sec: float) -> dict[str, torch.Tensor | None]:
        fps = self.fps
        first = max(0, math.ceil(float(start_sec) * fps - 1e-6))
        last = min(self.num_frames, math.ceil(float(end_sec) * fps - 1e-6))
        if last <= first:
            return {"video": None, "audio": None}
        return {"video": self.frames(range(first, last)).transpose(0, 1), "audio": None}

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class VideoRecord:
    """One manifest row joined with its cache entry."""

    index: int  # row in the manifest
    path: str  # relative to the data root
    cache: str  # the shard holding its frame pack
    label: int
    frames: int
    fps: float
    offset: int = 0  # of the pack in the shard
    length: int | None = None  # of the pack, in bytes


def clip_indices(start: int, clip_frames: int, stride: int, num_frames: int) -> list[int]:
    """Frame indices of a clip starting at `start`: `clip_frames` frames `stride` apart, looping back to the clip's
    own first frames when the video ends first (the reference's LoopPadding)."""
    own = list(range(start, min(start + clip_frames * stride, num_frames), stride)) or [min(start, num_frames - 1)]
    return [own[i % len(own)] for i in range(clip_frames)]


class ItemKey(NamedTuple):
    """What `EpochSampler` yields for a training item: the epoch it is drawn for, the video's position, and its
    weight in the loss: 0 for the filler that evens out the ranks' shares, so every video counts once an epoch."""

    epoch: int
    index: int
    weight: float = 1.0


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch generator seeded by (seed, epoch, index) alone, for every random draw of one training item."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class EpochSampler(DistributedSampler):
    """DistributedSampler's shuffling and sharding (order from seed + epoch), yielding `ItemKey(epoch, index,
    weight)`.

    Rank r of w takes positions r, r + w, ... of the epoch's order, so step s of every rank together is step s of one
    process whose batch is w times larger: the same clips (their draws come from (seed, epoch, video)). Where the
    videos do not divide among the ranks, DistributedSampler pads the order with videos from its start: those
    fillers come with weight 0 (the engine leaves them out of the loss and the metrics), so every video counts once
    an epoch across the world. `set_epoch(e)` (the engine calls it) names the epoch of the next pass; without it,
    each pass takes the epoch after the previous one. With `num_replicas=1` no process group is needed.
    """

    def __init__(self, size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)

    def __iter__(self) -> Iterator[ItemKey]:
        epoch, size = self.epoch, len(self.dataset)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)  # DistributedSampler's order
        order = torch.randperm(size, generator=generator).tolist()
        padded = (order * math.ceil(self.total_size / size))[: self.total_size] if size else []
        keys = [ItemKey(epoch, padded[p], 1.0 if p < size else 0.0)
                for p in range(self.rank, self.total_size, self.num_replicas)]
        self.epoch = epoch + 1  # the next pass's, unless set_epoch says otherwise
        return iter(keys)


class SkipCounter:
    """A count shared by the main process and every DataLoader worker (fork or spawn)."""

    def __init__(self) -> None:
        self._value = multiprocessing.get_context().Value("q", 0)

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    def reset(self) -> None:
        with self._value.get_lock():
            self._value.value = 0

    @property
    def value(self) -> int:
        return int(self._value.value)


def load_records(manifest_csv: str | Path, cache_root: str | Path) -> tuple[list[VideoRecord], list[str]]:
    """Join a manifest with the cache: (records of cached videos, paths left out because the cache lacks them)."""
    rows = read_manifest(manifest_csv)
    if not Path(cache_root).is_dir():
        raise AnnotationError(f"{cache_root}: no such folder. --cache must name the folder that the cache stage "
                              "writes: run `action3d stage cache` or `dvc repro`")
    index = read_index(cache_root)
    records, left_out = [], []
    for i, row in enumerate(rows):
        entry = index.get(row["path"])
        error = "not in the cache" if entry is None else entry.error or ("" if entry.frames else "no frames")
        if error:
            left_out.append(f"{row['path']}: {error}")
            continue
        records.append(VideoRecord(i, row["path"], str(Path(cache_root) / entry.shard), int(row["label"]),
                                   entry.frames, entry.fps, entry.offset, entry.bytes))
    if left_out:
        log.warning("%s: %d video(s) left out (not cached or unreadable), e.g. %s", manifest_csv, len(left_out),
                    left_out[0])
    return records, left_out


def window_starts(frames: int, fps: float, clip_frames: int, stride: int = 1) -> list[int]:
    """Start frames of every non-overlapping window of `clip_frames` x `stride` frames covering a video, from
    pytorchvideo's UniformClipSampler: what evaluation scores (and `action3d predict` too)."""
    rate = Fraction(fps).limit_denominator(1001)
    sampler = UniformClipSampler(Fraction(clip_frames * stride) / rate)
    duration, last_end, starts = Fraction(frames) / rate, Fraction(0), []
    while True:
        info = sampler(last_end, duration, {})
        starts.append(int(round(info.clip_start_sec * rate)))
        last_end = info.clip_end_sec
        if info.is_last_clip:
            return starts


class ClipDataset(Dataset):
    """Clips from frame packs. `train=True`: item `ItemKey(epoch, i)` = a random clip of video i for that epoch (a
    bare i means epoch 0); else item i = the i-th window.

    A training clip starts at a frame drawn uniformly from 0 .. frames - clip_frames * stride (0 for a shorter
    video, which is loop-padded). That draw and the `transform`'s (called with `generator=`) come from
    `item_generator(seed, epoch, i)`: the same key gives the same clip in any process.

    Items are {"video": float [3, T, H, W], "label": int, "video_index": int}, or None when the video could not
    be read (counted in `skipped_videos`; `collate_skip_bad` drops it).
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        clip_frames: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        train: bool,
        stride: int = 1,
        time_shuffle: bool = False,
        seed: int = 0,
    ):
        if clip_frames < 1 or stride < 1:
            raise ValueError(f"clip_frames and stride must be >= 1; got {clip_frames}, {stride}")
        self.records = list(records)
        self.clip_frames, self.stride, self.transform, self.train = clip_frames, stride, transform, train
        self.time_shuffle, self.seed = time_shuffle, seed
        self.counter = SkipCounter()
        self.clips: list[tuple[int, int]] = []  # (record, start frame)
        if not train:
            for r, rec in enumerate(self.records):
                self.clips += [(r, start) for start in self._windows(rec)]

    def _windows(self, rec: VideoRecord) -> list[int]:
        return window_starts(rec.frames, rec.fps, self.clip_frames, self.stride)

    def __len__(self) -> int:
        return len(self.records) if self.train else len(self.clips)

    @property
    def skipped_videos(self) -> int:
        return self.counter.value

    def __getitem__(self, key: int | ItemKey) -> dict[str, Any] | None:
        generator, weight = None, 1.0
        if self.train:
            epoch, r, weight = key if isinstance(key, tuple) else (0, key, 1.0)
            rec = self.records[r]
            generator = item_generator(self.seed, epoch, r)
            # the reference's TemporalRandomCrop: any start whose clip_frames x stride span fits in the video
            start = int(torch.randint(max(rec.frames - self.clip_frames * self.stride, 0) + 1, (), generator=generator))
        else:
            r, start = self.clips[key]
            rec = self.records[r]
        indices = clip_indices(start, self.clip_frames, self.stride, rec.frames)
        if self.time_shuffle:  # the temporal control: same frames, order destroyed (repeatable per clip)
            order = random.Random(f"{self.seed}:{key}").sample(range(len(indices)), len(indices))
            indices = [indices[k] for k in order]
        try:
            frames = PackedVideo(rec.cache, offset=rec.offset, length=rec.length).frames(indices)
        except (CacheError, OSError, RuntimeError, IndexError) as err:
            self.counter.add()
            log.warning("skipping unreadable video %s (%s)", rec.path, err)
            return None
        if not self.train:
            return {"video": self.transform(frames), "label": rec.label, "video_index": rec.index}
        return {"video": self.transform(frames, generator=generator), "label": rec.label, "video_index": rec.index,
                "weight": weight}


def collate_skip_bad(items: list[dict[str, Any] | None]) -> dict[str, torch.Tensor] | None:
    """default_collate over the readable items; None when none is readable."""
    good = [x for x in items if x is not None]
    return default_collate(good) if good else None


class ClipLoader(DataLoader):
    """A DataLoader that skips batches in which no clip was readable and counts unreadable videos per pass."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset.counter.reset()  # workers only run inside a pass, so the count is this pass's
        for batch in super().__iter__():
            if batch is not None:
                yield batch

    @property
    def skipped_videos(self) -> int:
        return self.dataset.skipped_videos


def _loader(
    dataset: ClipDataset, sampler, *, batch_size: int, workers: int, seed: int, drop_last: bool,
    pin_memory: bool | None, prefetch_factor: int | None,
) -> ClipLoader:
    # the loader's own generator seeds its workers (nothing we draw depends on that seed) and keeps DataLoader from
    # drawing that seed from torch's global generator, which the training process's model may use
    generator = torch.Generator().manual_seed(seed)
    return ClipLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_bad,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=(prefetch_factor or 2) if workers > 0 else None,
        generator=generator,
    )


def _world(distributed: bool | None, world_size: int | None, rank: int | None) -> tuple[int, int]:
    world = world_size if world_size is not None else (get_world_size() if distributed in (None, True) else 1)
    return world, (rank if rank is not None else get_rank() if world > 1 else 0)


def make_train_loader(
    manifest_csv: str | Path,
    cache_root: str | Path,
    *,
    clip_frames: int = 16,
    crop_size: int = 112,
    batch_size: int = 16,
    workers: int = 2,
    seed: int = 0,
    stride: int = 1,
    scales: Sequence[float] | None = None,
    hflip: float = 0.5,
    distributed: bool | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
) -> ClipLoader:
    """One random `clip_frames`-frame clip per video per epoch, with the paper's augmentation, shuffled.

    `stride` takes every stride-th frame. `scales` and `hflip` tune `TrainPreset` (hflip 0 for the demo, whose
    clockwise / counterclockwise classes a mirror would swap). An `EpochSampler` shuffles the videos from (seed,
    epoch) and, under torchrun (or `distributed=True` with `world_size`/`rank`), shards them; the engine calls its
    set_epoch. Each clip's start, crop and flip come from (seed, epoch, video), so `seed` must be the same on every
    rank, and a resumed run draws what an uninterrupted one would, whatever the workers. Every video is seen once
    per epoch, the last batch partial, as the reference trains (dropping it cost the demo's baseline 5 points:
    docs/fidelity.md); only a last batch of a single clip is dropped, which BatchNorm cannot normalise under DDP.
    Workers are persistent; memory is pinned when CUDA is available.
    """
    records, _ = load_records(manifest_csv, cache_root)
    if not records:
        raise AnnotationError(
            f"{manifest_csv}: no cached video to train on (cache root {cache_root}); run the cache stage")
    transform = TrainPreset(crop_size=crop_size, hflip=hflip, **({"scales": tuple(scales)} if scales else {}))
    dataset = ClipDataset(records, clip_frames=clip_frames, transform=transform, train=True, stride=stride, seed=seed)
    world, r = _world(distributed, world_size, rank)
    sampler = EpochSampler(len(dataset), seed=seed, num_replicas=world, rank=r)
    # a rank's share is ceil(n / world) items (DistributedSampler pads it); its last batch holds the remainder
    single = len(sampler) % batch_size == 1 and len(sampler) > 1
    return _loader(dataset, sampler, batch_size=batch_size, workers=workers, seed=seed, drop_last=single,
                   pin_memory=pin_memory, prefetch_factor=prefetch_factor)


def make_eval_loader(
    manifest_csv: str | Path,
    cache_root: str | Path,
    *,
    clip_frames: int = 16,
    crop_size: int = 112,
    batch_size: int = 16,
    workers: int = 2,
    stride: int = 1,
    time_shuffle: bool = False,
    seed: int = 0,
    distributed: bool | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
) -> ClipLoader:
    """Every non-overlapping `clip_frames`-frame window of every video, centre-cropped, in manifest order.

    Each item carries its video's manifest row in "video_index", so clip scores can be averaged per video.
    `time_shuffle` permutes the frames inside each clip (a fixed permutation per clip, from `seed`): the temporal
    control. Under torchrun each rank takes every world_size-th clip, unpadded (`ShardSampler`).
    """
    records, _ = load_records(manifest_csv, cache_root)
    if not records:
        raise AnnotationError(
            f"{manifest_csv}: no cached video to evaluate (cache root {cache_root}); run the cache stage")
    dataset = ClipDataset(records, clip_frames=clip_frames, transform=EvalPreset(crop_size=crop_size), train=False,
                          stride=stride, time_shuffle=time_shuffle, seed=seed)
    world, r = _world(distributed, world_size, rank)
    sampler = ShardSampler(len(dataset), rank=r, world_size=world) if world > 1 else SequentialSampler(dataset)
    return _loader(dataset, sampler, batch_size=batch_size, workers=workers, seed=seed, drop_last=False,
                   pin_memory=pin_memory, prefetch_factor=prefetch_factor)
