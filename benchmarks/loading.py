"""Video loading throughput: stock pytorchvideo vs the reference's JPEG frames vs our frame cache.

Five ways to get the same clips (same videos, same 16-frame windows) as the same float tensors
[3, 16, crop, crop], side by side in one run:

  (a) stock pytorchvideo: LabeledVideoDataset + PyAV decoder on the raw 320x240 H.264 videos (sparse keyframes);
  (b) the reference's way: one JPEG per frame at 320x240 (its generate_video_jpgs.py), read with PIL, resized and
      centre-cropped per frame with PIL as its spatial transforms do;
  (b') the same JPEG folders and reader, but with the frames of our cache: scaled to its short side and encoded at
      its quality, so that (b') vs (c) compares the formats alone and (b) vs (b') the resolutions;
  (c) ours: frame packs at the training resolution in shards (cache.py) through ClipDataset (loaders.py);
  (c') the same frame packs, one file per video (the cache's format before shards): (c) vs (c') is what shards cost.

Each is timed in one process pinned to one core (clips/s per worker process) and through a DataLoader with one
worker per core (clips/s for the whole machine); the median of `--repeats` runs is kept. Bytes on disk and files
per video are counted. JSON goes to benchmarks/results/loading.json; a markdown table is printed.

    python benchmarks/loading.py                      # synthesizes 24 ten-second 320x240 videos first
    python benchmarks/loading.py --videos 48 --clips 200 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from action3d.data.annotations import build_manifests
from action3d.data.cache import build_cache, decode_scaled, read_index
from action3d.data.loaders import ClipDataset, load_records
from action3d.data.synthetic import synth_kinetics
from action3d.data.transforms import KINETICS_MEAN, KINETICS_STD, EvalPreset
from action3d.data.video import write_atomic_text
from training import cpu_kind  # benchmarks/training.py: the script's folder is on sys.path

HERE = Path(__file__).resolve().parent


# --- (a) stock pytorchvideo -----------------------------------------------------------------------------------------


class FixedClipSampler:
    """A pytorchvideo clip sampler that returns the clip named in each video's annotation ("start" seconds)."""

    def __init__(self, clip_duration: Fraction):
        self.duration = clip_duration

    def __call__(self, last_clip_time, video_duration, annotation):
        from pytorchvideo.data.clip_sampling import ClipInfo

        start = annotation["start"]
        return ClipInfo(start, start + self.duration, 0, 0, True)

    def reset(self):
        pass


def stock_dataset(clips, root: Path, records, frames: int, fps: Fraction, crop: int):
    from pytorchvideo.data import LabeledVideoDataset

    preset = EvalPreset(crop_size=crop)

    def transform(sample):
        video = sample["video"].permute(1, 0, 2, 3).to(torch.uint8)  # pytorchvideo gives float [C, T, H, W]
        return {"video": preset(video[:frames]), "label": sample["label"]}

    paths = [(str(root / records[r].path), {"label": records[r].label, "start": Fraction(s) / fps}) for r, s in clips]
    return LabeledVideoDataset(paths, FixedClipSampler(Fraction(frames) / fps + Fraction(1, 1000)),
                               video_sampler=torch.utils.data.SequentialSampler, transform=transform,
                               decode_audio=False, decoder="pyav")


# --- (b) JPEG frames + PIL ------------------------------------------------------------------------------------------


def extract_jpegs(video: Path, out: Path, quality: int, short_side: int | None = None) -> None:
    """The reference's layout: <out>/image_00001.jpg ... at the video's size, or with the short side at
    `short_side` (scaled as the cache scales)."""
    from PIL import Image

    from action3d.data.video import read_frames

    out.mkdir(parents=True, exist_ok=True)
    frames = read_frames(video)[0] if short_side is None else decode_scaled(video, short_side).frames
    for i, frame in enumerate(frames, 1):
        Image.fromarray(frame).save(out / f"image_{i:05d}.jpg", quality=quality)


class JpegFrames(Dataset):
    """The reference's loader: PIL open + convert per frame, Resize(short side) + CenterCrop per frame, normalise."""

    def __init__(self, clips, folders, labels, frames: int, crop: int):
        self.clips, self.folders, self.labels, self.frames, self.crop = clips, folders, labels, frames, crop
        self.mean = torch.tensor(KINETICS_MEAN).view(3, 1, 1, 1)
        self.std = torch.tensor(KINETICS_STD).view(3, 1, 1, 1)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        from PIL import Image

        r, start = self.clips[i]
        out = []
        for k in range(start + 1, start + 1 + self.frames):
            with open(self.folders[r] / f"image_{k:05d}.jpg", "rb") as f:
                img = Image.open(f).convert("RGB")
            w, h = img.size
            scale = self.crop / min(w, h)
            img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            w, h = img.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            out.append(np.asarray(img.crop((left, top, left + self.crop, top + self.crop))))
        clip = torch.from_numpy(np.stack(out)).permute(3, 0, 1, 2).float().div_(255)
        return {"video": (clip - self.mean) / self.std, "label": self.labels[r]}


# --- timing ---------------------------------------------------------------------------------------------------------


def clips_per_second_one_process(dataset) -> float:
    """Read every clip of `dataset` in this process (no DataLoader), pinned to one core: decoders that start
    threads of their own (FFmpeg's, in PyAV) get no more than the one core a DataLoader worker has."""
    items = iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        start, count = time.perf_counter(), 0
        for item in items:
            assert item["video"].ndim == 4
            count += 1
        return count / (time.perf_counter() - start)
    finally:
        os.sched_setaffinity(0, cores)


def clips_per_second_loader(dataset, workers: int, batch: int = 4) -> float:
    """Read every clip through a DataLoader with `workers` processes; the first batch (start-up) is not timed."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=lambda b: b)
    it = iter(loader)
    next(it)
    start, count = time.perf_counter(), 0
    for b in it:
        count += len(b)
    return count / (time.perf_counter() - start) if count else float("nan")


def folder_bytes(paths) -> tuple[int, int]:
    files = [p for p in paths if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where to put videos and caches (default: a temp dir)")
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=10.0, help="per raw video (Kinetics clips are 10 s)")
    ap.add_argument("--crf", type=int, default=18, help="H.264 quality of the raw videos (18: about 400 kb/s)")
    ap.add_argument("--clips", type=int, default=120, help="clips timed per repeat in one process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clip-frames", type=int, default=16)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--short-side", type=int, default=128, help="resolution of our cache")
    ap.add_argument("--cache-quality", type=int, default=90, help="JPEG quality of our cache")
    ap.add_argument("--jpeg-quality", type=int, default=75, help="of the reference-style frames (PIL default)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "loading.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    raw = work / "raw"
    if not (raw / "kinetics_train.csv").exists():
        per_class = max(1, args.videos // 4)
        synth_kinetics(raw, classes=4, train_per_class=per_class, val_per_class=0, test_per_class=0,
                       seconds=args.seconds, crf=args.crf, seed=123)
    build_manifests("kinetics", raw, work / "splits", val_fraction=0.0, progress=False)
    build_cache(work / "splits", raw, work / "cache", short_side=args.short_side, quality=args.cache_quality)
    records, _ = load_records(work / "splits" / "train.csv", work / "cache")
    jpeg_dirs = [work / "jpg" / Path(r.path).with_suffix("") for r in records]
    small_dirs = [work / f"jpg{args.short_side}q{args.cache_quality}" / Path(r.path).with_suffix("") for r in records]
    for rec, folder, small in zip(records, jpeg_dirs, small_dirs):
        if not (folder / "image_00001.jpg").exists():
            extract_jpegs(raw / rec.path, folder, args.jpeg_quality)
        if not (small / "image_00001.jpg").exists():
            extract_jpegs(raw / rec.path, small, args.cache_quality, short_side=args.short_side)

    rng = random.Random(0)
    fps = Fraction(records[0].fps).limit_denominator(1001)
    clips = []  # the same clips for every method: (record, first frame)
    for _ in range(args.clips * args.repeats):
        r = rng.randrange(len(records))
        clips.append((r, rng.randrange(0, records[r].frames - args.clip_frames + 1)))

    ours = _ours(records, args, clips)
    reference = JpegFrames(clips, jpeg_dirs, [r.label for r in records], args.clip_frames, args.crop)
    # sanity: the three produce the same shape
    stock = next(iter(stock_dataset(clips[:1], raw, records, args.clip_frames, fps, args.crop)))
    shapes = {tuple(ours[0]["video"].shape), tuple(reference[0]["video"].shape), tuple(stock["video"].shape)}
    assert len(shapes) == 1, shapes

    index = read_index(work / "cache")
    single = work / "packs"  # (c'): each video's pack, the very bytes, in a file of its own
    for rec in records:
        entry = index[rec.path]
        target = single / f"{rec.path}.jpack"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(work / "cache" / entry.shard, "rb") as shard:
                shard.seek(entry.offset)
                target.write_bytes(shard.read(entry.bytes))
    single_records = [replace(r, cache=str(single / f"{r.path}.jpack"), offset=0) for r in records]
    stock = "stock pytorchvideo + PyAV, raw 320x240"
    jpeg = f"JPEG frames + PIL (reference: 320x240, q{args.jpeg_quality})"
    jpeg_small = f"JPEG frames + PIL ({args.short_side} px, q{args.cache_quality})"
    packs = f"frame packs in shards + our loader ({args.short_side} px, q{args.cache_quality})"
    one_pack = f"one frame pack per video + our loader ({args.short_side} px, q{args.cache_quality})"
    labels = [r.label for r in records]
    sizes = {
        stock: folder_bytes([raw / r.path for r in records]),
        jpeg: folder_bytes([p for d in jpeg_dirs for p in d.iterdir()]),
        jpeg_small: folder_bytes([p for d in small_dirs for p in d.iterdir()]),
        packs: folder_bytes(sorted({work / "cache" / index[r.path].shard for r in records})),
        one_pack: folder_bytes([Path(r.cache) for r in single_records]),
    }
    makers = {
        stock: lambda sub: stock_dataset(sub, raw, records, args.clip_frames, fps, args.crop),
        jpeg: lambda sub: JpegFrames(sub, jpeg_dirs, labels, args.clip_frames, args.crop),
        jpeg_small: lambda sub: JpegFrames(sub, small_dirs, labels, args.clip_frames, args.crop),
        packs: lambda sub: _ours(records, args, sub),
        one_pack: lambda sub: _ours(single_records, args, sub),
    }
    results = {}
    for name, make in makers.items():
        n = args.clips // (4 if "stock" in name else 1)  # the stock loader is slow: fewer clips, same ones
        one = [clips_per_second_one_process(make(clips[k * n:(k + 1) * n])) for k in range(args.repeats)]
        many = [clips_per_second_loader(make(clips[k * n:(k + 1) * n]), args.workers) for k in range(args.repeats)]
        nbytes, nfiles = sizes[name]
        results[name] = {
            "clips_per_s_per_process": statistics.median(one),
            "clips_per_s_machine": statistics.median(many),
            "bytes_per_video": nbytes / len(records),
            "files_per_video": nfiles / len(records),
            "clips_per_repeat": n,
            "repeats_per_process": one,
            "repeats_machine": many,
        }
        print(f"{name}: {results[name]['clips_per_s_per_process']:.1f} clips/s per process, "
              f"{results[name]['clips_per_s_machine']:.1f} machine", flush=True)

    ours = results[packs]
    report = {
        "setup": {"videos": len(records), "frames_per_video": records[0].frames, "clip_frames": args.clip_frames,
                  "raw_crf": args.crf, "raw_kbps": sizes[stock][0] / len(records) * 8 / 1e3 / args.seconds,
                  "crop": args.crop, "cache_short_side": args.short_side, "cache_quality": args.cache_quality,
                  "jpeg_quality": args.jpeg_quality,
                  "workers": args.workers, "repeats": args.repeats, "clips_per_repeat": args.clips,
                  "cpu": cpu_kind(), "cores": os.cpu_count(),
                  "torch": torch.__version__, "python": sys.version.split()[0],
                  "cache_index_entries": len(index)},
        "results": results,
        "ratios": {  # medians of the same run; "jpeg": the reference's frames, "jpeg_same_size": (b')
            "ours_vs_stock_per_process": ours["clips_per_s_per_process"] / results[stock]["clips_per_s_per_process"],
            "ours_vs_jpeg_per_process": ours["clips_per_s_per_process"] / results[jpeg]["clips_per_s_per_process"],
            "ours_vs_jpeg_same_size_per_process": (ours["clips_per_s_per_process"]
                                                   / results[jpeg_small]["clips_per_s_per_process"]),
            "ours_bytes_vs_jpeg": ours["bytes_per_video"] / results[jpeg]["bytes_per_video"],
            "ours_bytes_vs_jpeg_same_size": ours["bytes_per_video"] / results[jpeg_small]["bytes_per_video"],
            "shards_vs_one_pack_per_video_per_process": (ours["clips_per_s_per_process"]
                                                         / results[one_pack]["clips_per_s_per_process"]),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(args.out, json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(report))
    if tmp:
        tmp.cleanup()
    return report


def _ours(records, args, sub):
    ds = ClipDataset(records, clip_frames=args.clip_frames, transform=EvalPreset(crop_size=args.crop), train=False)
    ds.clips = sub
    return ds


def markdown_table(report: dict) -> str:
    rows = ["| loader | clips/s, one process | clips/s, machine | bytes per video | files per video |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in report["results"].items():
        rows.append(f"| {name} | {r['clips_per_s_per_process']:.1f} | {r['clips_per_s_machine']:.1f} | "
                    f"{r['bytes_per_video'] / 1e3:.0f} KB | {r['files_per_video']:.2g} |")
    ratios = report["ratios"]
    rows.append("")
    rows.append(f"per process, ours / stock: {ratios['ours_vs_stock_per_process']:.1f}x; ours / reference JPEG "
                f"frames: {ratios['ours_vs_jpeg_per_process']:.1f}x; ours / same-size JPEG frames: "
                f"{ratios['ours_vs_jpeg_same_size_per_process']:.1f}x; shards / one pack per video: "
                f"{ratios['shards_vs_one_pack_per_video_per_process']:.2f}x. Cache bytes / JPEG bytes: "
                f"{ratios['ours_bytes_vs_jpeg']:.2f} (reference), {ratios['ours_bytes_vs_jpeg_same_size']:.2f} "
                "(same size)")
    s = report["setup"]
    rows.append(f"({s['videos']} videos of {s['frames_per_video']} frames at {s['raw_kbps']:.0f} kb/s, "
                f"{s['clip_frames']}-frame clips, {s['crop']}x{s['crop']} crops, {s['workers']} workers, "
                f"median of {s['repeats']} runs, {s['cores']} cores)")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
