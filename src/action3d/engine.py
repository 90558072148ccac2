"""The training and evaluation loops: seeding, model preparation, optimisers and schedulers, one epoch, evaluation,
and `fit` (epochs with checkpoints and exact resume). Pure torch.

Checkpoint files and resume state live in `action3d.checkpoint`, the metrics in `action3d.metrics`; this module
only drives them. Nothing here tracks or orchestrates: stages call these functions and log what they return
(`fit`'s `on_epoch_end` is the hook for that). Batches are the dicts of the data loaders:
``{"video": float[B, 3, T, H, W], "label": int64[B], "video_index": int64[B]}``.

Under torchrun (see `action3d.distributed`) the same functions run on every rank: metrics are reduced over ranks,
evaluation gathers per-video score sums from every rank before averaging, and only rank 0 writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from action3d import distributed as dist
from action3d.progress import show_bars
from action3d.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    copy_checkpoint,
    make_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from action3d.errors import Action3dError
from action3d.metrics import (
    VideoScores,
    confusion_matrix,
    per_class_accuracy,
    scalar_metrics,
    sum_by_video,
    topk_accuracy,
)
from action3d.models.registry import unwrap_model

log = logging.getLogger(__name__)



class NonFiniteLossError(Action3dError, FloatingPointError):
    """The loss became NaN or infinite; `epoch` and `step` say where (the step counts from 0 in that epoch)."""

    def __init__(self, epoch: int, step: int, value: float, hint: str = ""):
        self.epoch, self.step, self.value, self.hint = epoch, step, value, hint
        super().__init__(
            f"loss is {value} at epoch {epoch}, step {step}: training stopped. Lower the learning rate, set a "
            f"gradient clip, or check that batch's inputs.{(' ' + hint) if hint else ''}"
        )

    def __reduce__(self):  # picklable (Prefect and multiprocessing ship exceptions between processes)
        return type(self), (self.epoch, self.step, self.value, self.hint)


# --- setup -----------------------------------------------------------------------------------------------------


def seed_everything(seed: int, *, deterministic: bool = False) -> torch.Generator:
    """Seed python, numpy and torch (CPU and every GPU); return a fresh generator for a DataLoader's shuffling.

    `deterministic=True` also asks torch and cuDNN for deterministic kernels (slower; warns where none exists).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def prepare_model(
    model: nn.Module, device: torch.device | str, *, channels_last: bool = False, compile: bool = False
) -> nn.Module:
    """Move `model` to `device`, optionally channels_last_3d and torch.compile, then wrap it in DDP under torchrun.

    Build the optimizer from the returned model's parameters (they are the same tensors as the input model's).
    `action3d.models.registry.unwrap_model` gives the plain module back, e.g. for its state_dict.
    """
    device = torch.device(device)
    model = model.to(device)
    if channels_last:  # NDHWC: faster 3D convolutions with bf16 on CPU and on tensor cores
        model = model.to(memory_format=torch.channels_last_3d)
    if compile:
        model = torch.compile(model)
    if dist.is_distributed():
        # DDP outside compile, so that evaluation can run `.module` (compiled, no DDP collectives) on uneven shards
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _without_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# --- optimisation: the paper's recipe and the alternatives -----------------------------------------------------


def build_optimizer(
    params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    dampening: float = 0.9,
    weight_decay: float = 1e-3,
    nesterov: bool = False,
) -> torch.optim.SGD:
    """SGD with the paper's defaults (lr 0.1, momentum 0.9, dampening 0.9, weight decay 1e-3, no Nesterov).

    `params` may be a module, in which case only its trainable parameters (requires_grad) are optimised: that is
    how fine-tuning from `ft_begin_module` leaves the frozen layers alone.
    """
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("build_optimizer: no trainable parameters (is every layer frozen?)")
    if nesterov and dampening != 0:
        # torch refuses Nesterov with dampening; the reference sets dampening 0 when nesterov is on
        raise ValueError(f"nesterov=True needs dampening=0 (got dampening={dampening}); set both in params.yaml")
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: Literal["plateau", "multistep", "cosine"] = "plateau",
    epochs: int | None = None,
    factor: float = 0.1,
    patience: int = 10,
    milestones: Iterable[int] = (50, 100, 150),
    warmup_epochs: int = 0,
    steps_per_epoch: int | None = None,
):
    """A learning-rate scheduler by name.

    - ``plateau``: the paper's: lr times `factor` when the validation loss has not improved for `patience` epochs
      (stepped once per epoch with that loss; `fit` does it).
    - ``multistep``: lr times `factor` at each epoch in `milestones`.
    - ``cosine``: linear warmup over `warmup_epochs`, then a cosine from the base lr down to 0 at `epochs`.

    multistep and cosine count epochs and are stepped once per epoch, unless `steps_per_epoch` is given: then they
    count optimiser steps (smoother warmup) and must be stepped every step (`FitConfig(..., scheduler_interval="step")`).
    """
    if name == "plateau":
        if steps_per_epoch is not None:
            raise ValueError("the plateau scheduler follows the validation loss once per epoch: drop steps_per_epoch")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience)
    unit = steps_per_epoch or 1
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [m * unit for m in milestones], gamma=factor)
    if name == "cosine":
        if not epochs or epochs <= warmup_epochs:
            raise ValueError(f"cosine needs epochs > warmup_epochs (got epochs={epochs}, warmup={warmup_epochs})")
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, _WarmupCosine(warmup=warmup_epochs * unit, total=epochs * unit)
        )
    raise ValueError(f"unknown scheduler '{name}': use plateau, multistep or cosine")


class _WarmupCosine:
    """LR factor at step i: (i+1)/warmup during the warmup, then a half cosine from 1 to 0 over the rest.

    torch's LambdaLR with the closed form. LinearLR then CosineAnnealingLR in a SequentialLR make the same schedule
    by recurrence, up to 1e-13 relative off it after 200 epochs (measured): enough to move every trained number."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / self.warmup
        progress = min(1.0, (i - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# --- one epoch -------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype not in (None, torch.bfloat16):
        # float16 would need a GradScaler; bf16 has float32's range and needs none
        raise ValueError(f"autocast_dtype must be None or torch.bfloat16, got {dtype}")
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _unpack(batch: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Mapping) or "video" not in batch or "label" not in batch:
        raise TypeError(
            "batches must be dicts with 'video' [B, 3, T, H, W], 'label' [B] and 'video_index' [B] "
            f"(action3d.data loaders); got {type(batch).__name__}"
        )
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    video = batch["video"].to(device, non_blocking=True, memory_format=fmt)
    return video, batch["label"].to(device, non_blocking=True)


def _per_sample(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The criterion with one loss per sample (reduction 'none'), for a weighted mean."""
    import copy

    if getattr(criterion, "reduction", None) is None:
        raise TypeError("under DDP the loss is weighted per clip: give a criterion with a `reduction` attribute, "
                        "such as nn.CrossEntropyLoss()")
    each = copy.copy(criterion)
    each.reduction = "none"
    return each


def _set_epoch(loader: Iterable, epoch: int) -> None:
    """Reshuffle distributed samplers per epoch (DistributedSampler, or a pytorchvideo dataset's video sampler)."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "dataset", None), "video_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _skipped_videos(loader: Iterable) -> int | None:
    """How many unreadable videos the loader (or its dataset) skipped, when it counts them as `skipped_videos`."""
    for obj in (loader, getattr(loader, "dataset", None)):
        value = getattr(obj, "skipped_videos", None)
        if value is not None:
            return int(value() if callable(value) else value)
    return None


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str,
    epoch: int,
    *,
    lr_scheduler: Any = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    channels_last: bool = False,
    log_every: int = 10,
    progress: bool = True,
) -> dict[str, float]:
    """Train for one pass over `data_loader`; return metrics summed over every rank.

    `lr_scheduler`, if given, is stepped after every optimiser step (per-epoch schedulers are the caller's).
    `grad_clip` clips the global gradient norm. Raises `NonFiniteLossError` (naming epoch and step) before the
    optimiser steps on a NaN/inf loss, on every rank at once.

    Returns {"loss": mean clip loss, "top1": clip accuracy, "clips": count, "clips_per_s": throughput over all
    ranks, "lr": the last lr used, "skipped_videos": only when the loader counts them}.
    """
    device = torch.device(device)
    model.train()
    _set_epoch(data_loader, epoch)
    loss_sum, correct, seen, lr = 0.0, 0, 0, float(optimizer.param_groups[0]["lr"])
    bar = tqdm(data_loader, desc=f"epoch {epoch} train", leave=False, disable=not (show_bars(progress) and dist.is_main_process()))
    start = time.perf_counter()
    weighted = dist.is_distributed()  # ranks' shares padded with fillers of weight 0 (EpochSampler)
    per_sample = _per_sample(criterion) if weighted else None
    for step, batch in enumerate(bar):
        video, label = _unpack(batch, device, channels_last)
        keep = batch["weight"].to(device, torch.float32) if weighted and "weight" in batch else None
        with _autocast(device, autocast_dtype):
            logits = model(video)
            if keep is None:
                loss = criterion(logits, label)
            else:  # the global batch's mean over real clips: DDP averages the ranks' gradients, hence x world
                local = (per_sample(logits, label).float() * keep).sum()
        if keep is None:
            value = loss.item()  # one sync per step: a NaN must stop us before it reaches the weights
            nonfinite = dist.any_rank(not math.isfinite(value), device)
        else:
            value, real = local.item(), float(keep.sum())
            flags, count = dist.all_reduce_sum([float(not math.isfinite(value)), real], device)
            nonfinite, loss = flags > 0, local * dist.get_world_size() / count
        if nonfinite:
            raise NonFiniteLossError(epoch, step, value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        if keep is None:
            n = label.shape[0]
            loss_sum += value * n
            correct += int((logits.argmax(dim=1) == label).sum())
        else:  # fillers count in neither the loss nor the accuracy
            n = real
            loss_sum += value
            correct += int(((logits.argmax(dim=1) == label) & (keep > 0)).sum())
        seen += n
        if step % max(1, log_every) == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.2e}")
    elapsed = time.perf_counter() - start
    loss_sum, correct, seen, elapsed = dist.all_reduce_sum([loss_sum, correct, seen, elapsed], device)
    if seen == 0:
        raise ValueError(f"epoch {epoch}: the training loader yielded no batches (empty manifest or split?)")
    metrics = {
        "loss": loss_sum / seen,
        "top1": correct / seen,
        "clips": int(seen),
        "clips_per_s": seen / (elapsed / dist.get_world_size()),
        "lr": lr,
    }
    skipped = _skipped_videos(data_loader)
    if skipped is not None:
        metrics["skipped_videos"] = int(dist.all_reduce_sum([skipped], device)[0])
    return metrics


# --- evaluation ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data_loader: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str,
    *,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Clip-level and video-level metrics over every clip of `data_loader` (summed over all ranks).

    `input_transform` is applied to each video batch [B, 3, T, H, W] on the device before the model, e.g. a
    shuffle of the time axis for the temporal control. Under DDP give the eval loader a sampler that does not pad
    (`action3d.distributed.ShardSampler`), or padded clips count twice.

    Returns scalars: "loss", "top1" (clip level), "video_top1", "video_top5", "mean_class_accuracy", "clips",
    "videos"; numpy arrays (video level): "per_class_accuracy" [C], "confusion_matrix" [C, C] (rows = truth),
    "video_index" [V], "video_probs" [V, C], "video_labels" [V]. Every rank returns the same values.
    """
    device = torch.device(device)
    model = _without_ddp(model)  # no DDP buffer broadcasts: ranks may hold different numbers of batches
    model.eval()
    loss_sum, correct, probs, indices, labels = 0.0, 0, [], [], []
    bar = tqdm(data_loader, desc="evaluate", leave=False,
               disable=not (show_bars(progress) and dist.is_main_process()))
    for batch in bar:
        video, label = _unpack(batch, device, channels_last)
        if "video_index" not in batch:
            raise KeyError("evaluation batches need 'video_index' (the video's manifest row) to group clips")
        if input_transform is not None:
            video = input_transform(video)
        with _autocast(device, autocast_dtype):
            logits = model(video)
            loss = criterion(logits, label)
        loss_sum += float(loss) * label.shape[0]
        correct += int((logits.argmax(dim=1) == label).sum())
        probs.append(logits.float().softmax(dim=1).cpu().numpy())
        indices.append(batch["video_index"].cpu().numpy())
        labels.append(label.cpu().numpy())
    loss_sum, correct, clips = dist.all_reduce_sum([loss_sum, correct, sum(len(x) for x in labels)], device)
    if clips == 0:
        raise ValueError("the evaluation loader yielded no batches (empty manifest or split?)")
    # ranks exchange per-video sums, not every clip's scores (Kinetics: ~300k clips x 400 classes)
    local = None
    if labels:
        clip_labels = np.concatenate(labels)
        local = sum_by_video(np.concatenate(indices), np.concatenate(probs), np.ones(len(clip_labels)), clip_labels)
    parts = [p for p in dist.all_gather_objects(local) if p is not None]
    merged = parts[0] if len(parts) == 1 else sum_by_video(*(np.concatenate(x) for x in zip(*parts)))
    videos, sums, counts, video_labels = merged
    scores = VideoScores(videos, sums / counts[:, None], video_labels)
    num_classes = scores.probs.shape[1]
    matrix = confusion_matrix(scores.labels, scores.probs.argmax(axis=1), num_classes)
    per_class = per_class_accuracy(matrix)
    return {
        "loss": loss_sum / clips,
        "top1": correct / clips,
        "video_top1": topk_accuracy(scores.probs, scores.labels, 1),
        "video_top5": topk_accuracy(scores.probs, scores.labels, 5),
        "mean_class_accuracy": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan"),
        "clips": int(clips),
        "videos": int(len(scores.labels)),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix,
        "video_index": scores.video_index,
        "video_probs": scores.probs,
        "video_labels": scores.labels,
    }


# --- the loop --------------------------------------------------------------------------------------------------


def _loader_generators(*loaders: Iterable | None) -> list[torch.Generator]:
    """The torch generators that drive the loaders' shuffling and worker seeds (each once, in a stable order)."""
    found: list[torch.Generator] = []
    for loader in loaders:
        for gen in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
    return found


def _last_checkpoint(path: Path) -> dict | str | None:
    """The checkpoint to resume from (on the CPU, to be sent to every rank), None when there is none, or why it
    cannot be read (every rank raises it, none is left waiting)."""
    if not path.is_file():
        return None
    try:
        return read_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        return f"cannot resume: {err} Delete {path} to start this run afresh."


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


@dataclass(frozen=True)
class FitConfig:
    """How `fit` trains: a run's knobs besides its model, data, optimiser and checkpoint folder."""

    epochs: int
    device: torch.device | str = "cpu"
    autocast_dtype: torch.dtype | None = None  # torch.bfloat16 for the layers action3d.precision keeps in bf16
    channels_last: bool = False
    grad_clip: float | None = None
    monitor: str = "val_video_top1"  # the metric best.pt follows
    mode: Literal["max", "min"] = "max"
    scheduler_interval: Literal["epoch", "step"] = "epoch"
    log_every: int = 10
    progress: bool = True


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    config: FitConfig,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    checkpoint_dir: str | Path,
    arch: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train for `config.epochs` epochs (validating after each) with a cross-entropy loss, checkpoint every epoch,
    resume where a run stopped.

    `model` comes from `prepare_model` and `optimizer`/`scheduler` from the builders above; `arch` and
    `model_kwargs` (what rebuilds the model, by default the ones `create_model` set on it) go into every
    checkpoint. Every epoch writes `checkpoint_dir/last.pt` (and `best.pt` when `monitor` improves in `mode`)
    atomically, rank 0 only. With an existing last.pt of the same `arch` and `model_kwargs`, training continues
    after its epoch with its weights, optimiser, scheduler, RNG and loader generator states: the remaining epochs
    give the same metrics as an uninterrupted run. A ReduceLROnPlateau is stepped with the epoch's val loss; other schedulers
    once per epoch, or every step with `scheduler_interval="step"`.

    `on_epoch_end(epoch, metrics)` runs on rank 0 after the epoch's checkpoint is written; metrics are the
    history entry: "epoch", "lr", "train_loss", "train_top1", "train_clips_per_s", ..., "val_loss", "val_top1",
    "val_video_top1", "val_video_top5", "val_mean_class_accuracy", ... It may raise to stop the run (the
    checkpoint is already safe); under DDP a raise on rank 0 alone leaves the other ranks waiting.

    Returns {"history": [...], "best_metric", "best_epoch", "epochs_resumed" (epochs found done in last.pt),
    "last_checkpoint": Path, "best_checkpoint": Path or None}.
    """
    device, monitor = torch.device(config.device), config.monitor
    criterion = nn.CrossEntropyLoss()
    target = unwrap_model(model)
    arch = getattr(target, "arch", None) if arch is None else arch
    model_kwargs = dict(getattr(target, "model_kwargs", {}) if model_kwargs is None else model_kwargs)
    checkpoint_dir = Path(checkpoint_dir)
    last_path, best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
    if val_loader is None and monitor.startswith("val_"):
        raise ValueError(f"monitor '{monitor}' needs a val_loader; pass one or monitor a train_ metric")
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and config.scheduler_interval == "step":
        raise ValueError("ReduceLROnPlateau steps once per epoch on the val loss: use scheduler_interval='epoch'")
    generators = _loader_generators(train_loader, val_loader)

    history: list[dict[str, float]] = []
    best_metric: float | None = None
    done = 0
    # the writer's last.pt, given to every rank: on many machines only the writer's disk holds it
    state = dist.from_writer(lambda: _last_checkpoint(last_path))
    if isinstance(state, str):
        raise CheckpointError(state)
    if state is not None:
        if state.get("arch") != arch or dict(state.get("model_kwargs") or {}) != dict(model_kwargs):
            raise CheckpointError(
                f"{last_path} was written by arch '{state.get('arch')}' with {state.get('model_kwargs')}, this "
                f"run builds '{arch}' with {dict(model_kwargs)}: delete it, or use another checkpoint_dir"
            )
        done = restore_checkpoint(
            state, model, optimizer=optimizer, scheduler=scheduler, generators=generators, source=str(last_path)
        )
        history, best_metric = list(state.get("history") or []), state.get("best_metric")
        log.info("resuming from %s after epoch %d of %d", last_path, done, config.epochs)
    epochs_resumed = done

    for epoch in range(done + 1, config.epochs + 1):
        try:
            train = train_one_epoch(
                model, criterion, optimizer, train_loader, device, epoch,
                lr_scheduler=scheduler if config.scheduler_interval == "step" else None,
                autocast_dtype=config.autocast_dtype, grad_clip=config.grad_clip, channels_last=config.channels_last,
                log_every=config.log_every, progress=config.progress,
            )  # fmt: skip
        except NonFiniteLossError as err:
            kept = f"the last good checkpoint is {last_path} (epoch {done})" if done else "no checkpoint was written"
            raise NonFiniteLossError(err.epoch, err.step, err.value, hint=kept) from None
        metrics = {"epoch": epoch, "lr": train.pop("lr"), **scalar_metrics(train, "train_")}
        dist.share_buffers(model)  # one model to score and to checkpoint, whichever rank writes
        if val_loader is not None:
            val = evaluate(
                model, criterion, val_loader, device,
                autocast_dtype=config.autocast_dtype, channels_last=config.channels_last, progress=config.progress,
            )  # fmt: skip
            metrics.update(scalar_metrics(val, "val_"))
        if monitor not in metrics:
            raise KeyError(f"monitor '{monitor}' is not among the epoch metrics {sorted(metrics)}")
        if plateau:
            scheduler.step(metrics["val_loss" if val_loader is not None else "train_loss"])
        elif scheduler is not None and config.scheduler_interval == "epoch":
            scheduler.step()
        improved = _improved(metrics[monitor], best_metric, config.mode)
        if improved:
            best_metric = metrics[monitor]
        history.append(metrics)
        done = epoch
        if dist.is_main_process():
            state = make_checkpoint(
                model, arch=arch, model_kwargs=model_kwargs, epoch=epoch, optimizer=optimizer, scheduler=scheduler,
                best_metric=best_metric, history=history, generators=generators, extra=extra,
            )  # fmt: skip
            save_checkpoint(state, last_path)
            if improved:
                copy_checkpoint(last_path, best_path)
            if on_epoch_end is not None:
                on_epoch_end(epoch, dict(metrics))
        dist.barrier()  # nobody races ahead of a checkpoint that a crash would resume from

    best_epoch = next((h["epoch"] for h in history if h.get(monitor) == best_metric), None)
    return {
        "history": history,
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "epochs_resumed": epochs_resumed,
        "last_checkpoint": last_path,
        "best_checkpoint": best_path if best_path.is_file() else None,
    }
