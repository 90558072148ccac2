"""What the training stages (scratch, finetune) share: loaders, precision, optimiser, resumable fit, the MLflow run
and the stage's outputs.

A training stage writes into its `out` folder:
    model.pt            the kept checkpoint (`keep`: the last epoch's, as the reference keeps, or the best epoch's by
                        validation video accuracy), rebuildable by name + kwargs, with the model card that lets it
                        classify raw videos
    history.csv         one row per epoch (DVC plots it)
    curves.png          loss, accuracy and learning rate per epoch
    run.json            the MLflow run id and the logged model's URI, for the stages after it
    checkpoints/<key>/  the run in progress (stages/checkpoints.py): a crash resumes from there
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from action3d import engine, precision
from action3d.atomic import write_csv, write_json
from action3d.checkpoint import copy_checkpoint, epochs_done
from action3d.predict import model_card
from action3d.config import Params, Train
from action3d.data import make_eval_loader, make_train_loader, read_classes, read_manifest
from action3d.data.cache import cache_digest
from action3d.distributed import barrier, init_distributed, pick_device
from action3d.plots import plot_history
from action3d.progress import say
from action3d.project import digest, file_md5, project_root, shareable_uri, tracking_uri
from action3d.stages import RunContext
from action3d.stages.checkpoints import CheckpointStore


def train(
    params: Params,
    *,
    label: str,
    knobs: Train,
    model: nn.Module,
    trainable: list[nn.Parameter] | None,
    manifests: str | Path,
    cache: str | Path,
    out: str | Path,
    ctx: RunContext,
    inputs: dict[str, Path] | None = None,
    source_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` (built by the caller: fresh, pretrained, frozen in part) on `manifests/train.csv`.

    `label` names the stage as DVC does (`scratch@pretrain`, `finetune`); `knobs` is its section of params.yaml.
    `inputs` are files whose content the run depends on (pretrained weights): part of the resume key and the
    lineage. Returns the stage's metrics: the epoch model.pt holds (`kept_epoch`) and its validation video accuracy,
    the best validation video accuracy and its epoch, the last epoch's training loss and accuracy (a baseline that
    never fits its training set is no baseline), the epochs run and how many were found done.
    """
    info = init_distributed()
    device = pick_device(knobs.device)
    engine.seed_everything(params.seed + info.rank)  # the ranks' own draws (dropout) differ
    manifests, cache, out = Path(manifests), Path(cache), Path(out)
    train_csv, val_csv = manifests / "train.csv", manifests / "val.csv"
    loader_args = dict(clip_frames=params.clip.frames, crop_size=params.clip.crop_size, stride=params.clip.stride,
                       workers=knobs.workers, batch_size=knobs.batch_size)
    train_loader = make_train_loader(train_csv, cache, seed=params.seed, scales=params.augment.scales,
                                     hflip=params.augment.hflip, **loader_args)
    has_val = val_csv.is_file() and any(row["label"] not in ("", "-1") for row in read_manifest(val_csv))
    val_loader = make_eval_loader(val_csv, cache, **loader_args) if has_val else None

    arch, model_kwargs = model.arch, dict(model.model_kwargs)
    plan = _precision(label, knobs, model.to(device), params, device)
    model = engine.prepare_model(model, device, channels_last=knobs.channels_last, compile=knobs.compile)
    optimizer = engine.build_optimizer(
        trainable if trainable is not None else model.parameters(), lr=knobs.lr, momentum=knobs.momentum,
        dampening=knobs.dampening, weight_decay=knobs.weight_decay, nesterov=knobs.nesterov,
    )  # fmt: skip
    scheduler = engine.build_scheduler(
        optimizer, name=knobs.scheduler, epochs=knobs.epochs, patience=knobs.plateau_patience,
        milestones=knobs.milestones, warmup_epochs=knobs.warmup_epochs,
    )  # fmt: skip

    digests = {name: file_md5(path) for name, path in {"train": train_csv, **(inputs or {})}.items()}
    if has_val:
        digests["val"] = file_md5(val_csv)
    key = resume_key(label, params, knobs, arch, model_kwargs, digests, cache_digest(cache), info.world_size)
    store = CheckpointStore(out, key, stage=label, mirror=params.storage.checkpoints, s3=_s3(params))
    if info.is_main:
        store.prepare()
    barrier()  # the other ranks resume from what rank 0 restored

    card = model_card(params, read_classes(manifests / "classes.json"))
    tracked = _tracked_run(params, label, store, ctx, digests, source_run_id, {
        **(tags or {}), "world_size": info.world_size, "precision": plan.summary(), "n_classes": len(card["classes"]),
    }) if info.is_main else contextlib.nullcontext()  # fmt: skip
    with tracked as run:
        if run is not None:
            store.record_run(run.run_id)
            ctx.run_id = run.run_id
            run.log_manifest(train_csv, context="train", digest=digests["train"])
            if has_val:
                run.log_manifest(val_csv, context="val", digest=digests["val"])
        monitor = "val_video_top1" if has_val else "train_top1"
        config = engine.FitConfig(
            epochs=knobs.epochs, device=device, autocast_dtype=torch.bfloat16 if plan.autocast else None,
            channels_last=knobs.channels_last, grad_clip=knobs.grad_clip, monitor=monitor,
        )  # fmt: skip
        result = engine.fit(
            model, train_loader, val_loader, config, optimizer=optimizer, scheduler=scheduler,
            checkpoint_dir=store.folder, arch=arch, model_kwargs=model_kwargs,
            on_epoch_end=_on_epoch(label, knobs.epochs, run, store, ctx),
            extra={"card": card},  # for `predict` and the served model
        )  # fmt: skip
        ctx.history = result["history"]
        last = result["history"][-1]
        kept, kept_path = kept_epoch(result, knobs.keep)
        metrics = {"kept_epoch": kept["epoch"], f"model_{monitor}": kept[monitor],
                   "best_epoch": result["best_epoch"], f"best_{monitor}": result["best_metric"],
                   "final_train_loss": last["train_loss"], "final_train_top1": last["train_top1"],
                   "epochs": len(result["history"]), "epochs_resumed": result["epochs_resumed"]}
        if run is not None:
            _write_outputs(out, kept_path, result["history"], label, run, card, metrics,
                           {"arch": arch, "model_kwargs": model_kwargs})
            write_json(out / "run.json", {"run_id": run.run_id, "tracking_uri": shareable_uri(run.tracking_uri),
                                          "experiment": params.tracking.experiment, **metrics})
        return metrics


def _precision(label: str, knobs: Train, model: nn.Module, params: Params, device: torch.device) -> precision.Plan:
    """Where bf16 is right and faster on this device, layer by layer (precision.plan); fp32 unless asked for."""
    if not knobs.bf16:
        return precision.Plan(note=f"{label.split('@')[0]}.bf16 is false")
    channels = model.model_kwargs.get("n_input_channels") or 3
    plan = precision.plan(model, (channels, params.clip.frames, params.clip.crop_size, params.clip.crop_size),
                          device=device, channels_last=knobs.channels_last)
    precision.apply(model, plan)
    say(f"[{label}] precision: {plan.summary()}")
    return plan


def resume_key(label: str, params: Params, knobs: Train, arch: str, model_kwargs: dict, digests: dict[str, str],
               cache_digest: str | None, world_size: int) -> str:
    """What a checkpoint may be resumed for: every knob the training depends on and the content of every input
    (manifests, the frame cache, pretrained weights), the number of processes, and the package's code (DVC re-runs
    a stage whose code changed: a finished checkpoint of the old code must not stand in for it). Not `keep`: which
    epoch becomes model.pt changes no weights, so a finished run only copies the other file."""
    return digest(label, params.seed, arch, model_kwargs, params.clip.model_dump(), params.augment.model_dump(),
                  params.cache.model_dump(),
                  knobs.model_dump(exclude={"workers", "device", "nproc", "nnodes", "keep"}),  # world_size says those
                  digests, cache_digest, world_size, code_digest())


def code_digest() -> str:
    """The action3d package's source, hashed."""
    import action3d

    package = Path(action3d.__file__).parent
    blob = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        blob.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    return blob.hexdigest()[:16]


def _s3(params: Params):
    if not params.storage.checkpoints:
        return None
    from action3d.storage import S3Config

    return S3Config.from_params(params.storage)


def _tracked_run(params: Params, label: str, store: CheckpointStore, ctx: RunContext, digests: dict[str, str],
                 source_run_id: str | None, tags: dict[str, Any]):
    """The stage's MLflow run. Every (re)start is a new run, so that a run's duration is the time it spent; a
    resumed stage links its run to the one that wrote the checkpoint, when that run is in this store (tags
    `resumed_from`, `epochs_resumed`)."""
    from action3d.tracking.runs import known_run, start_stage_run

    uri = tracking_uri()
    previous = store.previous_run()
    if previous and known_run(previous, tracking_uri=uri):
        tags = {**tags, "resumed_from": previous, "epochs_resumed": epochs_done(store.last)}
    return start_stage_run(
        label, experiment=params.tracking.experiment, tracking_uri=uri, params=params.flat(),
        params_hash=params.digest(), source_run_id=source_run_id, parent_run_id=ctx.parent_run_id,
        data_digests=digests, tags={**tags, **ctx.tags},
        repo_dir=project_root(),
    )  # fmt: skip


def _on_epoch(label: str, epochs: int, run, store: CheckpointStore, ctx: RunContext):
    """After every epoch (its checkpoint written): one line, the metrics to MLflow, the mirror, the caller's hook."""

    def callback(epoch: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("train_loss", "train_top1", "val_loss", "val_video_top1",
                                                             "lr") if k in metrics)
        say(f"[{label}] epoch {epoch}/{epochs}: {shown}")
        if run is not None:
            run.log_epoch(metrics, step=epoch)
        store.mirror()
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, metrics)  # tuning: report to the pruner, which may stop the run here

    return callback


def kept_epoch(result: dict, keep: str) -> tuple[dict[str, float], Path]:
    """The epoch whose weights become model.pt (its history entry, its checkpoint): the last one, or with `keep:
    best` the best by `fit`'s monitor. The reference keeps the last: on a validation set of a few videos the best
    epoch is often an early one that generalises worse (docs/fidelity.md)."""
    if keep == "best" and result["best_checkpoint"] is not None:
        return next(h for h in result["history"] if h["epoch"] == result["best_epoch"]), result["best_checkpoint"]
    return result["history"][-1], result["last_checkpoint"]


def _write_outputs(out: Path, kept: Path, history: list[dict], label: str, run, card: dict, metrics: dict,
                   metadata: dict) -> None:
    """model.pt (DVC's output), history.csv, curves.png; the curves, the metrics and the model in MLflow."""
    copy_checkpoint(kept, out / "model.pt")
    write_history(out / "history.csv", history)
    plot_history(history, out / "curves.png", title=label)
    run.log_artifact(out / "curves.png", "plots")
    run.log_metrics(metrics)
    run.log_model(out / "model.pt", card, metadata=metadata)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """history.csv, a DVC output under git: the epochs' metrics without wall-clock fields (`*_per_s`,
    `*_seconds`), so a rerun of the same knobs writes the same file; timings are in MLflow."""
    keys = [k for k in dict.fromkeys(k for row in history for k in row)
            if not k.endswith(("_per_s", "_seconds", "_elapsed_s"))]
    write_csv(path, keys, [[row.get(k, "") for k in keys] for row in history])
