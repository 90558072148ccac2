"""What pretrain and finetune share: loaders, optimiser, resumable fit, MLflow logging, the stage's outputs.

A training stage writes into its `out_dir`:
    model.pt            the best checkpoint (by validation video accuracy), rebuildable by name + kwargs
    history.csv         one row per epoch (DVC plots it)
    run.json            the MLflow run id and the logged model's URI, for the stages after it
    checkpoints/<key>/  last.pt and best.pt of the run in progress; `key` hashes the knobs and inputs, so a
                        re-run with the same ones resumes where a crash stopped it and any change starts afresh;
                        with `storage.checkpoints` set they are mirrored to S3 after every epoch and fetched back
                        when missing here (a retry on a fresh machine resumes too)
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from action3d import engine
from action3d.checkpoint import copy_checkpoint, epochs_done, model_card, model_from_checkpoint
from action3d.config import Params, Train
from action3d.data import make_eval_loader, make_train_loader, read_classes, read_manifest
from action3d.distributed import barrier, init_distributed
from action3d.plots import plot_history
from action3d.progress import say
from action3d.stages.common import cache_digest, digest, pick_device, project_root, tracking_uri, write_csv, write_json
from action3d.storage import file_md5


@dataclass
class StageHooks:
    """What a caller that runs training stages in-process (tuning) adds to them: tags on their MLflow run and a
    callback after every epoch, which may raise to stop the run (a pruned trial). The stage fills in its MLflow
    `run_id` and, when it finishes, the `history` of every epoch (resumed ones included)."""

    tags: dict[str, Any] = field(default_factory=dict)
    on_epoch: Callable[[int, dict[str, float]], None] | None = None
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


_HOOKS: ContextVar[StageHooks | None] = ContextVar("stage_hooks", default=None)


@contextlib.contextmanager
def stage_hooks(hooks: StageHooks):
    """Apply `hooks` to the training stages run inside the block."""
    token = _HOOKS.set(hooks)
    try:
        yield hooks
    finally:
        _HOOKS.reset(token)


def _has_rows(manifest: Path) -> bool:
    return manifest.is_file() and any(row["label"] not in ("", "-1") for row in read_manifest(manifest))


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """history.csv, a DVC output under git: the epochs' metrics without wall-clock fields (`*_per_s`,
    `*_seconds`), so a rerun of the same knobs writes the same file; timings are in MLflow (`on_epoch_end`)."""
    keys = [k for k in dict.fromkeys(k for row in history for k in row) if not _is_timing(k)]
    write_csv(path, keys, [[row.get(k, "") for k in keys] for row in history])


def _is_timing(key: str) -> bool:
    return key.endswith(("_per_s", "_seconds", "_elapsed_s"))


def train_stage(
    params: Params,
    *,
    stage: str,
    model: nn.Module,
    trainable: list[nn.Parameter] | None,
    train_cfg: Train,
    manifests_dir: str | Path,
    cache_dir: str | Path,
    out_dir: str | Path,
    inputs: dict[str, str | Path] | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model` (built by the caller: fresh, pretrained, frozen in part) on `manifests_dir/train.csv`.

    `train_cfg` is the stage's section of params.yaml (pretrain, finetune or scratch): epochs, batch, optimiser,
    schedule and speed knobs. `inputs` are files whose content the run depends on (a pretrained checkpoint): part
    of the resume key and the lineage. Returns the stage's metrics: best validation video accuracy and its epoch,
    the last epoch's training loss and accuracy (a baseline that never fits its training set is no baseline), the
    epochs run and how many were found done.
    """
    info = init_distributed()
    device = pick_device(train_cfg.device)
    engine.seed_everything(params.seed + info.rank)  # the ranks' own draws (dropout) differ
    manifests_dir, cache_dir, out_dir = Path(manifests_dir), Path(cache_dir), Path(out_dir)
    train_csv, val_csv = manifests_dir / "train.csv", manifests_dir / "val.csv"

    loader_args = dict(clip_frames=params.clip.frames, crop_size=params.clip.crop_size, stride=params.clip.stride,
                       workers=train_cfg.workers)
    train_loader = make_train_loader(train_csv, cache_dir, batch_size=train_cfg.batch_size, seed=params.seed,
                                     scales=params.augment.scales, hflip=params.augment.hflip, **loader_args)
    val_loader = None
    if _has_rows(val_csv):
        val_loader = make_eval_loader(val_csv, cache_dir, batch_size=train_cfg.batch_size, **loader_args)

    arch, model_kwargs = model.arch, dict(model.model_kwargs)
    bf16 = train_cfg.bf16
    if bf16 and device.type == "cpu":  # this CPU's bf16 kernels must compute the same gradients as fp32, or no bf16
        channels = model_kwargs.get("n_input_channels") or 3
        wrong = engine.bf16_convolution_errors(model, (channels, params.clip.frames, params.clip.crop_size,
                                                       params.clip.crop_size), channels_last=train_cfg.channels_last)
        if wrong:
            bf16 = False
            say(f"[{stage}] bf16 off, training in fp32: this CPU's bf16 convolutions give wrong results for "
                f"{len(wrong)} layer(s) ({', '.join(list(wrong)[:3])}, relative error up to {max(wrong.values()):.3g} "
                f"against fp32). Set {stage}.bf16: false to skip this check")
    model = engine.prepare_model(model, device, channels_last=train_cfg.channels_last, compile=train_cfg.compile)
    optimizer = engine.build_optimizer(
        trainable if trainable is not None else model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum,
        dampening=train_cfg.dampening, weight_decay=train_cfg.weight_decay, nesterov=train_cfg.nesterov,
    )  # fmt: skip
    scheduler = engine.build_scheduler(
        optimizer, name=train_cfg.scheduler, epochs=train_cfg.epochs, patience=train_cfg.plateau_patience,
        milestones=train_cfg.milestones, warmup_epochs=train_cfg.warmup_epochs,
    )  # fmt: skip

    # Resume only what the same knobs on the same inputs started; anything else starts afresh. The key covers every
    # knob the result depends on and the content of every input: manifests, the frame cache (its index lists each
    # pack's frames and bytes; the cache knobs too), a pretrained checkpoint, the number of processes, and the code
    # (DVC re-runs a stage whose code changed: a finished checkpoint of the old code must not stand in for it).
    input_md5 = {name: file_md5(path) for name, path in {"train": train_csv, **(inputs or {})}.items()}
    if val_loader is not None:
        input_md5["val"] = file_md5(val_csv)
    key = digest(stage, params.seed, arch, model_kwargs, params.clip.model_dump(), params.augment.model_dump(),
                 params.cache.model_dump(), train_cfg.model_dump(exclude={"workers", "device", "nproc"}), input_md5,
                 cache_digest(cache_dir), info.world_size, code_digest())
    checkpoint_dir = out_dir / "checkpoints" / key
    if info.is_main:
        for stale in (out_dir / "checkpoints").glob("*"):
            if stale.name != key:
                shutil.rmtree(stale, ignore_errors=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _restore_checkpoints(params, stage, checkpoint_dir)
    barrier()  # the other ranks resume from what rank 0 restored

    card = model_card(params, read_classes(manifests_dir / "classes.json"))
    run_id_file = checkpoint_dir / "mlflow_run_id"
    hooks = _HOOKS.get() or StageHooks()
    tracked = _tracked_run(
        params, stage=stage, run_id_file=run_id_file, parent_run_id=parent_run_id,
        tags={**(tags or {}), "world_size": info.world_size, "bf16": bf16, **hooks.tags},
        digests={k: v for k, v in input_md5.items() if k in ("train", "val")},
    ) if info.is_main else contextlib.nullcontext()  # fmt: skip

    with tracked as run:
        if run is not None:
            run_id_file.write_text(run.run_id)
            hooks.run_id = run.run_id
            run.log_manifest(train_csv, context="train", digest=input_md5["train"])
            if val_loader is not None:
                run.log_manifest(val_csv, context="val")
        mirror = _checkpoint_mirror(params, stage, checkpoint_dir)

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("train_loss", "train_top1", "val_loss",
                                                                 "val_video_top1", "lr") if k in metrics)
            say(f"[{stage}] epoch {epoch}/{train_cfg.epochs}: {shown}")
            if run is not None:
                run.log_epoch(metrics, step=epoch)
            mirror()
            if hooks.on_epoch is not None:
                hooks.on_epoch(epoch, metrics)  # tuning: report to the pruner, which may stop the run here

        monitor = "val_video_top1" if val_loader is not None else "train_top1"
        result = engine.fit(
            model, train_loader, val_loader, epochs=train_cfg.epochs, optimizer=optimizer, scheduler=scheduler,
            checkpoint_dir=checkpoint_dir, arch=arch, model_kwargs=model_kwargs, device=device,
            autocast_dtype=torch.bfloat16 if bf16 else None, channels_last=train_cfg.channels_last,
            grad_clip=train_cfg.grad_clip, monitor=monitor, on_epoch_end=on_epoch_end,
            extra={"card": card},  # for `predict` and the served model
        )  # fmt: skip
        hooks.history = result["history"]
        last = result["history"][-1]
        metrics = {"best_epoch": result["best_epoch"], f"best_{monitor}": result["best_metric"],
                   "final_train_loss": last["train_loss"], "final_train_top1": last["train_top1"],
                   "epochs": len(result["history"]), "epochs_resumed": result["epochs_resumed"]}
        if run is None:
            return metrics

        best = result["best_checkpoint"] or result["last_checkpoint"]
        copy_checkpoint(best, out_dir / "model.pt")  # DVC's output
        write_history(out_dir / "history.csv", result["history"])
        plot_history(result["history"], out_dir / "curves.png", title=stage)
        run.log_artifact(out_dir / "curves.png", "plots")
        run.log_metrics(metrics)
        run.log_artifact(out_dir / "model.pt", "checkpoint")
        run.log_artifact(manifests_dir / "classes.json")
        example = torch.zeros(2, 3, params.clip.frames, params.clip.crop_size, params.clip.crop_size)
        model_uri = run.log_model(model_from_checkpoint(out_dir / "model.pt"), example,
                                  metadata={"arch": arch, "model_kwargs": model_kwargs})
        if "trial" not in hooks.tags:  # a tuning trial is never registered: no second copy of its weights
            from action3d.serving import log_video_model  # what the register stage registers: videos in, labels out

            log_video_model(out_dir / "model.pt", card, metadata={"arch": arch, "model_kwargs": model_kwargs})
        from action3d.stages.common import shareable_uri  # a tracked file: no machine path, no password

        write_json(out_dir / "run.json", {"run_id": run.run_id, "model_uri": model_uri,
                                          "tracking_uri": shareable_uri(run.tracking_uri),
                                          "experiment": params.tracking.experiment, **metrics})
        return metrics


def _tracked_run(params: Params, *, stage: str, run_id_file: Path, parent_run_id, tags, digests):
    from action3d.tracking import known_run, start_stage_run

    # Every (re)start of a stage is a new MLflow run, so that a run's duration is the time it spent. A resumed stage
    # links its run to the one that wrote the checkpoint (when that run is in this store): tags `resumed_from` and
    # `epochs_resumed` (the epochs the checkpoint holds done; the `epochs_resumed` metric says the same at the end).
    previous = run_id_file.read_text().strip() if run_id_file.is_file() else None
    link: dict[str, Any] = {}
    if previous and known_run(previous, tracking_uri=tracking_uri()):
        link = {"resumed_from": previous, "epochs_resumed": epochs_done(run_id_file.parent / engine.LAST_CHECKPOINT)}
    return start_stage_run(
        stage, experiment=params.tracking.experiment, tracking_uri=tracking_uri(), params=params.flat(),
        params_hash=params.digest(), parent_run_id=parent_run_id, data_digests=digests, tags={**(tags or {}), **link},
        repo_dir=project_root(),
    )  # fmt: skip


def code_digest() -> str:
    """The action3d package's source, hashed: part of the resume key."""
    import hashlib

    import action3d

    package = Path(action3d.__file__).parent
    blob = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        blob.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    return blob.hexdigest()[:16]


def train_from_scratch(params: Params, *, stage: str, train_cfg: Train, manifests_dir: str | Path,
                       cache_dir: str | Path, out_dir: str | Path, tags: dict[str, Any] | None = None) -> dict:
    """The network of `model` from seeded random weights, every layer trained with `train_cfg` (pretrain, scratch)."""
    from action3d.data import read_classes
    from action3d.models import create_model

    classes = read_classes(Path(manifests_dir) / "classes.json")
    engine.seed_everything(params.seed)  # the initial weights are part of the run: same seed, same model
    model = create_model(params.model.name, n_classes=len(classes), **params.model.kwargs)
    return train_stage(params, stage=stage, model=model, trainable=None, train_cfg=train_cfg,
                       manifests_dir=manifests_dir, cache_dir=cache_dir, out_dir=out_dir, tags=tags)


def _mirror_folder(params: Params, stage: str, checkpoint_dir: Path) -> str:
    """`<storage.checkpoints>/<stage>/<key>/`: the S3 folder that mirrors `checkpoint_dir`."""
    return f"{params.storage.checkpoints.rstrip('/')}/{stage}/{checkpoint_dir.name}/"


def _s3_config(params: Params):
    from action3d.storage import S3Config

    return S3Config.from_env(endpoint_url=params.storage.endpoint_url, region=params.storage.region)


def _checkpoint_mirror(params: Params, stage: str, checkpoint_dir: Path):
    """A callable that copies last.pt/best.pt to `storage.checkpoints` when set (else does nothing)."""
    if not params.storage.checkpoints:
        return lambda: None
    from action3d.storage import mirror_checkpoint

    config, target = _s3_config(params), _mirror_folder(params, stage, checkpoint_dir)

    def mirror() -> None:
        # best.pt first: a mirror cut short between the two then holds a last.pt no newer than its best.pt
        for name in (engine.BEST_CHECKPOINT, engine.LAST_CHECKPOINT):
            if (checkpoint_dir / name).is_file():
                mirror_checkpoint(checkpoint_dir / name, target, config=config)

    return mirror


def _restore_checkpoints(params: Params, stage: str, checkpoint_dir: Path) -> None:
    """Fetch last.pt and best.pt from the `storage.checkpoints` mirror when `checkpoint_dir` has no last.pt, so
    that a retried run on a fresh machine resumes after the last epoch it finished. Nothing mirrored: nothing to do.

    The objects land in a staging folder first and last.pt moves in last, so a restore cut short leaves no last.pt
    (the next run restores again, continuing the partial downloads) and never a last.pt without its best.pt.
    """
    last = checkpoint_dir / engine.LAST_CHECKPOINT
    if not params.storage.checkpoints or last.is_file():
        return
    from action3d.storage import sync_down

    source, staging = _mirror_folder(params, stage, checkpoint_dir), checkpoint_dir / ".restoring"
    fetched = {t.local_path.relative_to(staging).as_posix()
               for t in sync_down(source, staging, config=_s3_config(params), progress=False)}
    if engine.LAST_CHECKPOINT in fetched:
        for name in (engine.BEST_CHECKPOINT, engine.LAST_CHECKPOINT):
            if name in fetched:
                (staging / name).replace(checkpoint_dir / name)
        say(f"[{stage}] restored epoch {epochs_done(last)} from {source}")
    shutil.rmtree(staging, ignore_errors=True)
