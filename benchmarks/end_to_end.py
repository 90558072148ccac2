"""End to end: our loaders feeding our engine, what the training stage runs, at the demo's size and the paper's.

Builds a small synthetic set with our own code (synth_kinetics -> build_manifests -> build_cache, at both cache
resolutions from the same raw videos), then trains with what `stages/training.py` uses: `make_train_loader` (frame
packs, TrainPreset, persistent workers), `engine.prepare_model` / `build_optimizer` / `train_one_epoch`, and for
tracking `action3d.tracking.start_stage_run` + `StageRun.log_manifest` + `StageRun.log_epoch` once per epoch, as
the stage's `on_epoch_end` does, on a temporary sqlite store. Two sizes:

  demo   params.yaml: its raw videos (synth.*), cache short side, clip frames and crop, model and kwargs, and the
         pretrain section's batch, bf16 and channels_last;
  paper  short side 128, crop 112, 16 frames, resnet18, channels_last_3d, batch 8 on the CPU (32 on a GPU); the
         same raw videos, a subset of them per epoch (`--paper-videos`) to keep epochs short. bf16 autocast on a
         GPU only, unless --paper-bf16: on the 2-core development CPU (oneDNN in torch 2.14.1) bf16 Conv3d weight
         gradients come out wrong for inputs 2 frames deep, which ResNet's layer3 gets from 16-frame clips
         (training.py's kernel check shows it; inf at times, so training can stop on a NaN loss).

Measured, per size:

  workers   clips/s of training epochs, and the share of the epoch's wall time spent blocked in the loader's
            next() (data wait), for 0, 1, ... os.cpu_count() DataLoader workers. One loader per worker count, all
            alive at once; one untimed epoch each first (its time, worker start-up included, is reported as
            first_epoch_s); then `--repeats` rounds, one epoch per worker count per round, order alternating.
  tracking  the same `--tracking-epochs` epochs with MLflow off and on (start_stage_run with the params, tags and
            git state; log_manifest; log_epoch per epoch; the run's end), `--repeats` rounds alternating, at the
            pretrain section's worker count. Reported: the time spent inside the tracking calls as a share of
            the training time (the direct measure; with short epochs the run's start dominates it), log_epoch's
            share of an epoch, the difference of the medians of the two totals (noisy on a shared machine), and a
            projection onto the demo's pretrain stage (its epochs over its whole training
            set at the measured clips/s, per-epoch logging and one run start/end): the issue's goal is <= 2%.
            Left out: the one-off creation of the sqlite store and mlflow's import (reported apart), and what the
            stage logs after training (curves, checkpoint, the model), which runs once, not per epoch.

Epochs on a 2-core machine share the cores between the model's threads and the loader's workers: clips/s and
data wait say how that trade goes. JSON goes to benchmarks/results/end_to_end.json; a markdown table is printed.

    python benchmarks/end_to_end.py                 # about 5 minutes on 2 cores (mostly the paper size)
    python benchmarks/end_to_end.py --quick         # a smoke test (about a minute)
    python benchmarks/end_to_end.py --workdir /tmp/e2e --sizes paper --repeats 5   # keeps and reuses the data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from action3d import engine
from training import cpu_kind  # benchmarks/training.py: the script's folder is on sys.path
from action3d.atomic import write_atomic_text
from action3d.config import load_params
from action3d.data.annotations import build_manifests
from action3d.data.cache import build_cache
from action3d.data.loaders import make_train_loader
from action3d.data.synthetic import synth_kinetics
from action3d.metrics import scalar_metrics
from action3d.models import create_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Size:
    name: str
    short_side: int
    crop: int
    frames: int
    arch: str
    kwargs: dict
    batch: int
    bf16: bool
    channels_last: bool
    videos: int | None  # per epoch: a subset of the training manifest (None = all of it)
    manifest: Path = field(default=Path())
    cache: Path = field(default=Path())


class TimedLoader:
    """Wraps a loader and adds up the time its consumer spends blocked in next() (`wait`, seconds)."""

    def __init__(self, loader):
        self.loader, self.wait = loader, 0.0

    def __getattr__(self, name):  # sampler, dataset, skipped_videos: what the engine looks up
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                self.wait += time.perf_counter() - start
                return
            self.wait += time.perf_counter() - start
            yield batch


class Trainer:
    """One model, its optimiser and the engine's settings for a size; `epoch(loader)` trains one pass."""

    def __init__(self, size: Size, n_classes: int, device: torch.device, lr: float, params, compile: bool):
        torch.manual_seed(0)
        self.size, self.device, self.count = size, device, 0
        model = create_model(size.arch, n_classes=n_classes, **size.kwargs)
        self.model = engine.prepare_model(model, device, channels_last=size.channels_last, compile=compile)
        t = params.scratch.pretrain  # the stage's optimiser knobs, but a small lr: no warmup here, and speed ignores it
        self.optimizer = engine.build_optimizer(self.model, lr=lr, momentum=t.momentum, dampening=t.dampening,
                                                weight_decay=t.weight_decay, nesterov=t.nesterov)
        self.criterion = nn.CrossEntropyLoss()

    def epoch(self, loader: TimedLoader) -> dict:
        """Train one epoch; return its metrics as fit's history has them, plus wall time and data wait."""
        self.count += 1
        loader.wait = 0.0
        start = time.perf_counter()
        train = engine.train_one_epoch(
            self.model, self.criterion, self.optimizer, loader, self.device, self.count,
            autocast_dtype=torch.bfloat16 if self.size.bf16 else None, channels_last=self.size.channels_last,
            progress=False,
        )  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - start
        metrics = {"epoch": self.count, "lr": train.pop("lr"), **scalar_metrics(train, "train_")}
        return {"metrics": metrics, "wall_s": wall, "wait_s": loader.wait, "clips": train["clips"]}


# --- data -----------------------------------------------------------------------------------------------------------


def build_data(work: Path, params, sizes: list[Size], args) -> int:
    """Raw videos, manifests and one cache per size under `work` (kept and reused); return the class count."""
    raw, splits = work / "raw", work / "splits"
    s = params.synth
    classes = args.classes
    per_class = max(1, -(-args.videos // classes))
    started = time.perf_counter()
    if not (raw / "kinetics_train.csv").exists():
        synth_kinetics(raw, classes=classes, train_per_class=per_class, val_per_class=0, test_per_class=0,
                       seed=s.seed, width=s.width, height=s.height, fps=s.fps, seconds=s.seconds,
                       gop=s.gop, crf=s.crf, progress=False)
    if not (splits / "train.csv").exists():
        build_manifests("kinetics", raw, splits, val_fraction=0.0, progress=False)
    lines = (splits / "train.csv").read_text().splitlines(keepends=True)
    for size in sizes:
        size.cache = work / f"cache{size.short_side}"
        build_cache(splits, raw, size.cache, short_side=size.short_side, quality=params.cache.quality,
                    min_frames=params.split.min_frames, progress=False)
        size.manifest = splits / "train.csv"
        if size.videos is not None and size.videos < len(lines) - 1:
            # a subset: rows spread over the classes (the manifest lists them class by class)
            step = (len(lines) - 1) / size.videos
            rows = [lines[1 + int(i * step)] for i in range(size.videos)]
            size.manifest = work / f"train_{size.name}.csv"
            size.manifest.write_text(lines[0] + "".join(rows))
    print(f"data ready in {time.perf_counter() - started:.0f} s ({len(lines) - 1} videos, {classes} classes)",
          flush=True)
    return classes


def make_loader(size: Size, params, workers: int, seed: int) -> TimedLoader:
    """The training stage's loader, with its knobs from params.yaml (clip stride, augmentation)."""
    return TimedLoader(make_train_loader(
        size.manifest, size.cache, clip_frames=size.frames, crop_size=size.crop, stride=params.clip.stride,
        batch_size=size.batch, workers=workers, seed=seed, scales=params.augment.scales, hflip=params.augment.hflip,
    ))  # fmt: skip


# --- the two measurements -------------------------------------------------------------------------------------------


def sweep_workers(trainer: Trainer, size: Size, params, workers: list[int], repeats: int) -> dict:
    loaders = {w: make_loader(size, params, w, params.seed) for w in workers}
    first = {w: trainer.epoch(loaders[w]) for w in workers}
    runs: dict[int, list[dict]] = {w: [] for w in workers}
    for rep in range(repeats):
        for w in workers if rep % 2 == 0 else list(reversed(workers)):
            runs[w].append(trainer.epoch(loaders[w]))
        shown = ", ".join(f"{w}: {runs[w][-1]['clips'] / runs[w][-1]['wall_s']:.1f}" for w in workers)
        print(f"  {size.name}: round {rep + 1}/{repeats}, clips/s by workers {shown}", flush=True)
    out = {}
    for w in workers:
        rates = [r["clips"] / r["wall_s"] for r in runs[w]]
        waits = [r["wait_s"] / r["wall_s"] for r in runs[w]]
        out[str(w)] = {"clips_per_s": statistics.median(rates), "data_wait_fraction": statistics.median(waits),
                       "first_epoch_s": first[w]["wall_s"], "clips_per_epoch": runs[w][0]["clips"],
                       "repeats_clips_per_s": rates, "repeats_data_wait_fraction": waits}
    del loaders  # ends their persistent workers
    return out


def tracked_epochs(trainer: Trainer, loader: TimedLoader, epochs: int, tracking: dict | None, params) -> dict:
    """`epochs` epochs, with MLflow off (tracking None) or on, timing training and tracking apart."""
    train_s, track_s, clips = 0.0, 0.0, 0
    start = time.perf_counter()
    if tracking is None:
        for _ in range(epochs):
            r = trainer.epoch(loader)
            train_s, clips = train_s + r["wall_s"], clips + r["clips"]
        return {"total_s": time.perf_counter() - start, "train_s": train_s, "tracking_s": 0.0, "clips": clips}
    from action3d.tracking.runs import start_stage_run

    t0 = time.perf_counter()
    with start_stage_run(
        "scratch@pretrain", experiment=tracking["experiment"], tracking_uri=tracking["uri"], params=params.flat(),
        params_hash=params.digest(), data_digests={"train": tracking["digest"]}, repo_dir=ROOT,
        tags={"benchmark": "end_to_end"},
    ) as run:  # fmt: skip
        run.log_manifest(tracking["manifest"], context="train", digest=tracking["digest"])  # as the stage does
        opened = time.perf_counter() - t0
        per_epoch = []
        for _ in range(epochs):
            r = trainer.epoch(loader)
            train_s, clips = train_s + r["wall_s"], clips + r["clips"]
            t1 = time.perf_counter()
            run.log_epoch(r["metrics"], step=r["metrics"]["epoch"])
            per_epoch.append(time.perf_counter() - t1)
        t2 = time.perf_counter()
    closed = time.perf_counter() - t2
    track_s = opened + sum(per_epoch) + closed
    return {"total_s": time.perf_counter() - start, "train_s": train_s, "tracking_s": track_s, "clips": clips,
            "run_start_s": opened, "run_end_s": closed, "log_epoch_s": per_epoch}


def compare_tracking(trainer: Trainer, size: Size, params, workers: int, epochs: int, repeats: int,
                     tracking: dict) -> dict:
    loader = make_loader(size, params, workers, params.seed)
    trainer.epoch(loader)  # start the workers, untimed
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for rep in range(repeats):
        for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
            runs[mode].append(tracked_epochs(trainer, loader, epochs, tracking if mode == "on" else None, params))
        print(f"  {size.name}: tracking round {rep + 1}/{repeats}: off {runs['off'][-1]['total_s']:.1f} s, "
              f"on {runs['on'][-1]['total_s']:.1f} s (tracking calls {runs['on'][-1]['tracking_s']:.2f} s)",
              flush=True)
    on, off = runs["on"], runs["off"]
    direct = [r["tracking_s"] / r["train_s"] for r in on]
    log_epoch = [s for r in on for s in r["log_epoch_s"]]
    return {
        "workers": workers,
        "epochs_per_run": epochs,
        "clips_per_epoch": on[0]["clips"] // epochs,
        "median_total_s": {"off": statistics.median(r["total_s"] for r in off),
                           "on": statistics.median(r["total_s"] for r in on)},
        "overhead_fraction_direct": statistics.median(direct),
        "overhead_fraction_ab": (statistics.median(r["total_s"] for r in on)
                                 / statistics.median(r["total_s"] for r in off) - 1),
        "run_start_s": statistics.median(r["run_start_s"] for r in on),
        "run_end_s": statistics.median(r["run_end_s"] for r in on),
        "log_epoch_s": statistics.median(log_epoch),
        "log_epoch_fraction": statistics.median(log_epoch) / statistics.median(r["train_s"] / epochs for r in on),
        "train_clips_per_s": statistics.median(r["clips"] / r["train_s"] for r in on + off),
        "runs": runs,
    }


def project_demo_stage(params, tracking: dict) -> dict:
    """The tracking share of the demo's pretrain stage: per-epoch logging over its epochs, one run start and end,
    against its epochs over its whole training set at the clips/s measured here (validation left out, which
    only lowers the share)."""
    p, s = params.scratch.pretrain, params.synth.sets.pretrain
    clips = (s.classes * s.train_per_class) // p.batch_size * p.batch_size
    train_s = p.epochs * clips / tracking["train_clips_per_s"]
    track_s = tracking["run_start_s"] + tracking["run_end_s"] + p.epochs * tracking["log_epoch_s"]
    return {"epochs": p.epochs, "clips_per_epoch": clips, "train_s": train_s, "tracking_s": track_s,
            "fraction": track_s / train_s}


# --- main -----------------------------------------------------------------------------------------------------------


def sizes_from(params, args, device: torch.device) -> list[Size]:
    t = params.scratch.pretrain
    demo = Size("demo", params.cache.short_side, params.clip.crop_size, params.clip.frames, params.model.name,
                dict(params.model.kwargs), 4 if args.quick else t.batch_size, t.bf16, t.channels_last, None)
    paper_batch = 2 if args.quick else args.paper_batch or (32 if device.type == "cuda" else 8)
    bf16 = device.type == "cuda" if args.paper_bf16 is None else args.paper_bf16
    paper = Size("paper", 128, 112, 16, "resnet18", {}, paper_batch, bf16, True, args.paper_videos)
    return [s for s in (demo, paper) if s.name in args.sizes]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="keep videos and caches here (default: a temp dir)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--sizes", nargs="+", default=["demo", "paper"], choices=["demo", "paper"])
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    ap.add_argument("--videos", type=int, default=96, help="training videos (demo epochs use them all)")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--paper-videos", type=int, default=32, help="videos per epoch at the paper's size")
    ap.add_argument("--paper-batch", type=int, default=None, help="default: cpu 8, cuda 32")
    ap.add_argument("--paper-bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast at the paper's size (default: on for cuda, off for cpu; see above)")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="loader workers to sweep (default: 0 .. os.cpu_count())")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the worker sweep and of tracking off/on")
    ap.add_argument("--tracking-epochs", type=int, default=2, help="epochs per tracked (or untracked) run")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (params.yaml's default: off)")
    ap.add_argument("--quick", action="store_true", help="few small videos, one round: a smoke test")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "end_to_end.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.videos, args.classes, args.paper_videos, args.repeats, args.tracking_epochs = 16, 4, 8, 1, 1

    params = load_params(args.params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    workers = args.workers if args.workers is not None else list(range((os.cpu_count() or 1) + 1))
    sizes = sizes_from(params, args, device)
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    started = time.perf_counter()
    n_classes = build_data(work, params, sizes, args)

    t0 = time.perf_counter()
    import mlflow  # noqa: F401  (its import is a one-off of the process, not of tracking)
    from action3d.project import file_md5
    from action3d.tracking.store import experiment_id

    import_s = time.perf_counter() - t0
    uri = f"sqlite:///{work / 'mlflow.db'}"
    t0 = time.perf_counter()
    experiment_id("benchmark", tracking_uri=uri)  # creates the store (schema migrations): one-off
    store_s = time.perf_counter() - t0
    stage_workers = min(params.scratch.pretrain.workers, os.cpu_count() or 1)

    results = {}
    for size in sizes:
        print(f"{size.name}: {size.arch} {size.kwargs or ''}, batch {size.batch} x 3 x {size.frames} x {size.crop}"
              f" x {size.crop} from a {size.short_side}-px cache, bf16 {size.bf16}, channels_last "
              f"{size.channels_last}", flush=True)
        trainer = Trainer(size, n_classes, device, args.lr, params, args.compile)
        by_workers = sweep_workers(trainer, size, params, workers, args.repeats)
        tracking = {"uri": uri, "experiment": "benchmark", "manifest": size.manifest,
                    "digest": file_md5(size.manifest)}
        tracked = compare_tracking(trainer, size, params, stage_workers, args.tracking_epochs, args.repeats,
                                   tracking)
        results[size.name] = {
            "arch": size.arch, "kwargs": size.kwargs, "batch": size.batch,
            "clip": [3, size.frames, size.crop, size.crop], "cache_short_side": size.short_side, "bf16": size.bf16,
            "channels_last": size.channels_last, "workers": by_workers, "tracking": tracked,
        }
        if size.name == "demo":
            results[size.name]["tracking"]["projected_demo_pretrain"] = project_demo_stage(params, tracked)
        del trainer

    report = {
        "setup": {"device": str(device), "cpu": cpu_kind(), "cpu_count": os.cpu_count(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
                  "videos": args.videos, "classes": n_classes, "video_seconds": params.synth.seconds,
                  "video_size": [params.synth.width, params.synth.height], "repeats": args.repeats,
                  "tracking_epochs": args.tracking_epochs, "stage_workers": stage_workers, "quick": args.quick,
                  "mlflow_import_s": import_s, "mlflow_store_create_s": store_s,
                  "seconds": time.perf_counter() - started},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(args.out, json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(report))
    print(f"\n(JSON: {args.out})")
    if tmp:
        tmp.cleanup()
    return report


def markdown_table(report: dict) -> str:
    rows = ["| size | model | batch | clip | workers | clips/s | data wait | first epoch |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for name, r in report["results"].items():
        clip = "x".join(str(d) for d in r["clip"][1:])
        for w, m in r["workers"].items():
            rows.append(f"| {name} | {r['arch']} | {r['batch']} | {clip} | {w} | {m['clips_per_s']:.1f} | "
                        f"{100 * m['data_wait_fraction']:.0f}% | {m['first_epoch_s']:.1f} s |")
    rows += ["", "| size | workers | epochs per run | tracking share (direct) | on/off - 1 (A/B) | run start | "
                 "run end | log_epoch | log_epoch / epoch | projected demo pretrain |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["results"].items():
        t = r["tracking"]
        proj = t.get("projected_demo_pretrain")
        shown = f"{100 * proj['fraction']:.2f}% of {proj['train_s']:.0f} s" if proj else "-"
        rows.append(f"| {name} | {t['workers']} | {t['epochs_per_run']} | {100 * t['overhead_fraction_direct']:.2f}% | "
                    f"{100 * t['overhead_fraction_ab']:+.1f}% | {t['run_start_s']:.2f} s | {t['run_end_s']:.3f} s | "
                    f"{1e3 * t['log_epoch_s']:.0f} ms | {100 * t['log_epoch_fraction']:.2f}% | {shown} |")
    s = report["setup"]
    rows.append("")
    rows.append(f"Goal: tracking <= 2% of training time. ({s['videos']} videos of "
                f"{s['video_seconds']} s, {s['cpu_count']} cores, {s['threads']} threads, torch {s['torch']}, "
                f"median of {s['repeats']} rounds; mlflow import {s['mlflow_import_s']:.1f} s and store creation "
                f"{s['mlflow_store_create_s']:.1f} s are one-offs, not counted)")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
