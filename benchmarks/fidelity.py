"""Fidelity to the reference: our training path against kenshohara/3D-ResNets-PyTorch's, one difference at a time.

Part 1, parity (seconds): one fixed clip and one fixed batch through our transforms and our engine's step, against
the re-statement of the reference in tests/reference.py (the tests hold the same bounds): grey levels apart after
the training crop and the test crop, and how far our SGD step is from the reference's.

Part 2, ablation (about 25 minutes on 2 cores): the demo's baseline, `scratch@finetune`'s own stage function with
params.yaml's knobs, trained for each seed with today's defaults, and again with one behaviour changed at a time:

  our former behaviour, put back
    best-epoch      model.pt = the epoch best on validation (keep: best): scored on the default runs, no retraining
    drop-partial    the last partial batch dropped every epoch (70 videos, batch 8: 8 steps, not 9)
  the reference's behaviour where we kept ours
    ref-centre      the centre crop's offset rounded half to even (ours rounds down: a pixel apart at most)
    ref-starts      a clip's first frame drawn in 0 .. n - T - 1 (TemporalRandomCrop) instead of 0 .. n - T
    ref-resize      the crop resized by PIL per frame instead of torchvision on the clip
    ref-pixels      frames extracted by the ffmpeg command line as the reference's generate_video_jpgs does
                    (short side = cache.short_side, ffmpeg's default JPEG quality); only where `ffmpeg` is on PATH
    ref-windows     a loop-padded last test window when a video ends inside it: scored on the default runs
    ref-test-crop   at test, the frame resized to short side = crop, then the centre crop: on the default runs

Per variant and seed: test video top-1 (the demo's 140 videos), train video top-1 (the fit), and the kept epoch's
validation loss and video top-1 (14 videos): what the choices were made on. Seeds differ in their trajectories by
several points (a one-frame change of the draw range moves a seed by up to 13 points), so read a difference of
three-seed means against that spread. JSON in benchmarks/results/fidelity.json; docs/fidelity.md quotes it.

Needs the demo's small set split and cached: `dvc repro cache@finetune-0` (make run does it).

    python benchmarks/fidelity.py                       # parity, then the ablation over seeds 0 1 2
    python benchmarks/fidelity.py --parity-only
    python benchmarks/fidelity.py --variants default drop-partial --seeds 0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fidelity.json"
SPLITS, CACHE = ROOT / "data/splits/finetune", ROOT / "data/cache/finetune"
TRAINED = ("default", "drop-partial", "ref-centre", "ref-starts", "ref-resize", "ref-pixels")


def cpu_kind() -> str:
    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" \
        if "avx2" in flags else "other"
    return f"{platform.processor() or platform.machine()}, {kind}, {os.cpu_count()} cores"


# --- part 1: parity on one clip and one batch --------------------------------------------------------------------


def parity() -> dict:
    sys.path.insert(0, str(ROOT))
    import copy

    import torch

    from action3d import engine
    from action3d.data.transforms import KINETICS_MEAN, KINETICS_STD, EvalPreset, TrainPreset
    from action3d.models import create_model
    from tests import reference
    from tests.unit.test_reference_parity import _clip

    level = 1 / 255 / min(KINETICS_STD)
    norm = dict(mean=KINETICS_MEAN, std=KINETICS_STD)
    clip, out = _clip(), {}
    worst = []
    for scale in (1.0, 0.84, 0.71):
        for position in ("c", "tl", "tr", "bl", "br"):
            preset = TrainPreset(crop_size=56, scales=(scale,), positions=(position,), hflip=0.0)
            box = preset.crop.draw(*clip.shape[-2:])
            ours = preset(clip)
            theirs = reference.train_transform(clip, size=56, scale=scale, position=position, **norm,
                                               box=(box["top"], box["left"]))  # ours: the centre a pixel aside
            worst.append(float((ours - theirs).abs().max() / level))
    out["train_crop_max_levels"] = round(max(worst), 3)
    diff = (EvalPreset(crop_size=56)(clip) - reference.eval_transform(clip, size=56, **norm)).abs()
    out["test_crop_mean_levels"], out["test_crop_max_levels"] = round(float(diff.mean() / level), 3), round(
        float(diff.max() / level), 3)

    torch.manual_seed(0)
    model = create_model("resnet10", n_classes=7, widen_factor=0.25, conv1_t_size=3)
    theirs, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    knobs = dict(lr=0.007, momentum=0.9, dampening=0.0, weight_decay=8.7e-4, nesterov=False)
    g = torch.Generator().manual_seed(1)
    batch = {"video": torch.randn(6, 3, 16, 56, 56, generator=g), "label": torch.arange(6), "video_index": torch.arange(6)}
    ours = engine.prepare_model(model, "cpu", channels_last=True)
    engine.train_one_epoch(ours, torch.nn.CrossEntropyLoss(), engine.build_optimizer(ours, **knobs), [batch], "cpu", 1,
                           channels_last=True, progress=False)
    reference.train_step(theirs, reference.sgd(theirs.parameters(), **knobs), batch["video"], batch["label"])
    relative = []
    for name, value in theirs.state_dict().items():
        if value.is_floating_point():
            step = value - before[name]
            relative.append(float((model.state_dict()[name] - before[name] - step).norm() / step.norm()))
    out["step_max_relative_difference"] = float(f"{max(relative):.3g}")
    return out


# --- part 2: one training run of one variant (a subprocess of its own) -------------------------------------------


@contextlib.contextmanager
def variant(name: str):
    """Our code with one behaviour changed; `default` changes nothing."""
    import action3d.data.loaders as loaders
    import action3d.data.transforms as transforms
    import action3d.stages.training as training

    saved = []

    def swap(owner, attr, value):
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    if name == "drop-partial":
        make = loaders.make_train_loader

        def dropping(*args, **kwargs):
            loader = make(*args, **kwargs)
            loader.batch_sampler.drop_last = True
            return loader

        swap(training, "make_train_loader", dropping)
    elif name == "ref-centre":
        draw = transforms.MultiScaleCornerCrop.draw

        def rounded(self, height, width, generator=None):
            box = draw(self, height, width, generator)
            side = box["height"]
            if (box["top"], box["left"]) == ((height - side) // 2, (width - side) // 2):  # the centre
                box.update(top=round((height - side) / 2), left=round((width - side) / 2))
            return box

        swap(transforms.MultiScaleCornerCrop, "draw", rounded)
    elif name == "ref-starts":
        getitem = loaders.ClipDataset.__getitem__

        def one_frame_less(self, key):  # the draw range n - T + 1 becomes n - T, nothing else moves
            if not self.train:  # evaluation windows: as they are
                return getitem(self, key)
            index = key[1] if isinstance(key, tuple) else key
            rec = self.records[index]
            if rec.frames <= self.clip_frames * self.stride:
                return getitem(self, key)
            self.records[index] = dataclasses.replace(rec, frames=rec.frames - 1)
            try:
                return getitem(self, key)
            finally:
                self.records[index] = rec

        swap(loaders.ClipDataset, "__getitem__", one_frame_less)
    elif name == "ref-resize":
        import numpy as np
        import torch
        from PIL import Image

        def pil_resize(inpt, params, size):
            t, left, h, w = params["top"], params["left"], params["height"], params["width"]
            frames = [Image.fromarray(f.permute(1, 2, 0).numpy()).crop((left, t, left + w, t + h))
                      .resize((size, size), Image.BILINEAR) for f in inpt]
            return torch.stack([torch.from_numpy(np.asarray(f)).permute(2, 0, 1) for f in frames])

        swap(transforms, "_crop_resize", pil_resize)
    elif name not in ("default", "ref-pixels"):
        raise SystemExit(f"unknown variant {name}")
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


def loop_padded_windows(frames: int, fps: float, clip_frames: int, stride: int = 1) -> list[int]:
    """The reference's SlidingWindow starts: every window from frame 0, the last one even when the video ends
    inside it (loop-padded by `clip_indices`)."""
    span, starts = clip_frames * stride, []
    for start in range(0, frames, span):
        starts.append(start)
        if start + span >= frames:
            break
    return starts


def score(params, model: Path, split: str, cache: Path, rescore: str = "") -> dict:
    import action3d.data.loaders as loaders
    from action3d.stages.evaluate import score as stage_score

    with contextlib.ExitStack() as stack:
        if rescore == "ref-windows":
            original = loaders.window_starts
            loaders.window_starts = loop_padded_windows
            stack.callback(setattr, loaders, "window_starts", original)
        if rescore == "ref-test-crop":
            original = loaders.EvalPreset
            loaders.EvalPreset = reference_test_crop()
            stack.callback(setattr, loaders, "EvalPreset", original)
        metrics = stage_score(params, model=model, manifest=SPLITS / f"{split}.csv", cache=cache, control=False)[0]
    return {"video_top1": metrics["video_top1"], "loss": metrics["loss"]}


def reference_test_crop():
    import torch
    from torchvision.transforms.v2 import functional as F

    from action3d.data.transforms import EvalPreset

    class ResizeThenCrop(EvalPreset):
        def _spatial(self, video, generator):
            size = self.pipeline.transforms[0].size
            h, w = F.get_size(video)
            new = [size, int(size * w / h)] if h <= w else [int(size * h / w), size]
            out = F.resize(video.contiguous(memory_format=torch.channels_last), new, antialias=True)
            return F.crop(out, round((new[0] - size) / 2), round((new[1] - size) / 2), size, size)

    return ResizeThenCrop


def ffmpeg_cache(short_side: int, work: Path) -> Path:
    """A cache of the reference's pixels: every video's frames extracted by the ffmpeg command line (as its
    generate_video_jpgs: scale to the short side, default JPEG quality), packed as they are into one shard."""
    from PIL import Image

    from action3d.data.cache import CacheEntry, pack_bytes, read_index, slice_dir, write_index

    out = work / "ref-pixels-cache"
    if (slice_dir(out, 0) / "index.csv").is_file():
        return out
    data_root, entries, packs, offset = ROOT / "data/demo/finetune", [], [], 0
    for rel, entry in sorted(read_index(CACHE).items()):
        frames = work / "jpg" / rel
        frames.mkdir(parents=True, exist_ok=True)
        scale = f"scale=-1:{short_side}" if entry.width >= entry.height else f"scale={short_side}:-1"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(data_root / rel), "-vf", scale, "-threads", "1",
                        str(frames / "image_%05d.jpg")], check=True)
        files = sorted(frames.glob("image_*.jpg"))
        width, height = Image.open(files[0]).size
        packs.append(pack_bytes([f.read_bytes() for f in files], height=height, width=width, fps=entry.fps))
        entries.append(CacheEntry(rel, "shard-0000.a3d", offset, len(packs[-1]), len(files), height, width, entry.fps,
                                  entry.fingerprint))
        offset += len(packs[-1])
    slice_dir(out, 0).mkdir(parents=True, exist_ok=True)
    (slice_dir(out, 0) / "shard-0000.a3d").write_bytes(b"".join(packs))
    write_index(slice_dir(out, 0), entries)
    return out


def one_run(name: str, seed: int, work: Path) -> dict:
    os.chdir(ROOT)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"  # the project's store is left alone
    from action3d.config import load_params
    from action3d.stages import scratch

    params = load_params(ROOT / "params.yaml", [f"seed={seed}", "scratch.finetune.keep=last"])
    cache = ffmpeg_cache(params.cache.short_side, work) if name == "ref-pixels" else CACHE
    out = work / f"{name}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with variant(name):
        metrics = scratch.run(params, role="finetune", manifests=SPLITS, cache=cache, out=out)
    seconds = time.perf_counter() - start
    checkpoints = next((out / "checkpoints").iterdir())
    # (label, checkpoint, its epoch, how it is scored): the default runs also score the rescored variants
    scorings = [(name, checkpoints / "last.pt", metrics["epochs"], "")]
    if name == "default":
        scorings += [("best-epoch", checkpoints / "best.pt", metrics["best_epoch"], ""),
                     ("ref-windows", checkpoints / "last.pt", metrics["epochs"], "ref-windows"),
                     ("ref-test-crop", checkpoints / "last.pt", metrics["epochs"], "ref-test-crop")]
    row = {"variant": name, "seed": seed, "train_seconds": round(seconds, 1)}
    for label, path, epoch, rescore in scorings:
        val = score(params, path, "val", cache, rescore)
        row[label] = {"epoch": epoch, "test": score(params, path, "test", cache, rescore)["video_top1"],
                      "train": score(params, path, "train", cache, rescore)["video_top1"],
                      "val_loss": val["loss"], "val_video_top1": val["video_top1"]}
    return row


# --- the driver ----------------------------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> dict:
    table: dict[str, dict] = {}
    for row in rows:
        for label, result in row.items():
            if isinstance(result, dict):
                table.setdefault(label, {"seeds": {}})["seeds"][row["seed"]] = result
    for label, entry in table.items():
        seeds = entry["seeds"].values()
        entry.update({f"mean_{k}": round(statistics.mean(s[k] for s in seeds), 4)
                      for k in ("test", "train", "val_loss", "val_video_top1")})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(TRAINED), choices=TRAINED)
    parser.add_argument("--parity-only", action="store_true")
    parser.add_argument("--work", type=Path, help="where runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.work)))
        return

    result = {"cpu": cpu_kind(), "date": time.strftime("%Y-%m-%d"), "parity": parity()}
    print("parity:", json.dumps(result["parity"]))
    if not args.parity_only:
        from action3d.data.cache import index_files

        if not index_files(CACHE):
            raise SystemExit(f"{CACHE} is missing: run `dvc repro cache@finetune-0` first")
        variants = [v for v in args.variants if v != "ref-pixels" or shutil.which("ffmpeg")]
        if "ref-pixels" in args.variants and "ref-pixels" not in variants:
            print("ref-pixels left out: no ffmpeg on PATH")
        work = args.work or Path(tempfile.mkdtemp(prefix="fidelity-"))
        rows = []
        for name in variants:
            for seed in args.seeds:
                kept = work / f"{name}-{seed}.json"  # a run done before in this --work: a rerun goes on from there
                if not kept.is_file():
                    env = {**os.environ, "ACTION3D_QUIET": "1"}
                    done = subprocess.run([sys.executable, __file__, "--one", name, str(seed), "--work", str(work)],
                                          capture_output=True, text=True, env=env)
                    if done.returncode != 0:
                        raise SystemExit(f"{name}, seed {seed} failed:\n{done.stderr[-3000:]}")
                    kept.write_text(done.stdout.strip().splitlines()[-1] + "\n")
                rows.append(json.loads(kept.read_text()))
                print(json.dumps(rows[-1]), flush=True)
        result.update(seeds=args.seeds, runs=rows, table=summarise(rows))
        for label, entry in result["table"].items():
            print(f"{label:14s} test {entry['mean_test']:.3f}  fit {entry['mean_train']:.3f}  "
                  f"val loss {entry['mean_val_loss']:.3f}  val top-1 {entry['mean_val_video_top1']:.3f}  "
                  f"per seed {[round(s['test'], 3) for s in entry['seeds'].values()]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
