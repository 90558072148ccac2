"""Checkpoints in and out, and the transfer-learning steps around them.

Two kinds of file are read, always with `torch.load(..., weights_only=True)` so
a downloaded file can never run code:

- the reference's (kenshohara/3D-ResNets-PyTorch): {"arch", "epoch",
  "state_dict", "optimizer"} or a bare state_dict, keys often prefixed
  "module." (DataParallel);
- ours: {"arch": registry name, "model_kwargs": {...}, "state_dict": ...,
  "epoch", "optimizer", ...}, written by `save_checkpoint(checkpoint_state(...))`.

Only tensors and plain containers (dict, list, tuple, str, int, float, bool,
None) survive weights_only loading: keep anything else (numpy RNG state, custom
objects) out of a checkpoint, or convert it to tensors or lists first.

Fine-tuning the paper's way: build the target model (new class count), call
`load_pretrained` (the classifier is re-initialised when class counts differ),
then `freeze_before(model, "layer4")` and give the returned parameters to the
optimizer.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from action3d.atomic import atomic_write
from action3d.errors import Action3dError

from .registry import create_model, is_model

# DataParallel / DistributedDataParallel save "module.", torch.compile "_orig_mod.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

Source = str | os.PathLike | Mapping


class CheckpointMismatchError(Action3dError, ValueError):
    """A checkpoint's tensors do not fit the model it is loaded into."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_pretrained` found: the file's arch and epoch (None when absent),
    the class count of its classifier, and whether the model kept a fresh head."""

    arch: str | None
    epoch: int | None
    n_pretrain_classes: int
    head_replaced: bool


def _describe(source: Source) -> str:
    return "checkpoint dict" if isinstance(source, Mapping) else str(source)


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def _strip_wrapper_prefix(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_checkpoint(source: Source, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file (or take a dict) and normalise it.

    Returns a dict with at least "state_dict" (wrapper prefixes such as "module."
    removed) plus whatever else the file holds ("arch", "epoch", "model_kwargs", ...).
    A bare state_dict comes back as {"state_dict": ...}.
    """
    where = _describe(source)
    if isinstance(source, Mapping):
        ckpt = source
    else:
        try:
            ckpt = torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{where}: refused to load it with weights_only=True, because it holds objects other than "
                f"tensors and plain containers and unpickling them could run code from the file. Load it in "
                f"a trusted session and re-save only its state_dict. Details: {err}"
            ) from err
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{where}: expected a dict (a checkpoint or a state_dict), found {type(ckpt).__name__}")
    if "state_dict" in ckpt:
        state, extra = ckpt["state_dict"], {k: v for k, v in ckpt.items() if k != "state_dict"}
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, extra = ckpt, {}
    else:
        raise ValueError(
            f"{where}: neither a checkpoint with a 'state_dict' entry nor a bare state_dict; "
            f"its top-level keys are {sorted(map(str, ckpt))[:10]}"
        )
    return {**extra, "state_dict": {_strip_wrapper_prefix(k): v for k, v in state.items()}}


def _classifier_name(model: nn.Module) -> str:
    name = getattr(model, "classifier_name", None)
    if name is None:
        raise TypeError(
            f"{type(model).__name__} has no `classifier_name` attribute naming its classifier module; "
            f"models built by action3d.models.create_model have one"
        )
    return name


def _mismatch_message(where: str, model: nn.Module, ckpt_arch, problems: list[tuple]) -> str:
    key, ckpt_shape, model_shape = problems[0]
    if ckpt_shape is None:
        first = f"{key!r} (shape {model_shape}) is in the model but not in the checkpoint"
    elif model_shape is None:
        first = f"{key!r} (shape {ckpt_shape}) is in the checkpoint but not in the model"
    else:
        first = f"{key!r} has shape {ckpt_shape} in the checkpoint but {model_shape} in the model"
    keys = [problem[0] for problem in problems]
    if all(".downsample." in k for k in keys):
        # Type-A shortcuts have no parameters: only the projection (type B) adds downsample keys.
        shortcut = "A" if all(problem[1] is None for problem in problems) else "B"
        fix = (
            f"the checkpoint was trained with shortcut_type='{shortcut}': "
            f"build the model with shortcut_type='{shortcut}'"
        )
    else:
        said = f" (the file says arch={ckpt_arch!r})" if ckpt_arch else ""
        fix = (
            f"build the model that matches the checkpoint{said}: another model name (family or depth), "
            f"or other width (widen_factor, k, cardinality) or stem (n_input_channels, conv1_t_size) settings"
        )
    arch = getattr(model, "arch", type(model).__name__)
    return f"{where} does not fit model {arch!r}: {first}; {len(problems)} key(s) differ in all. Fix: {fix}."


def load_pretrained(
    model: nn.Module, source: Source, *, map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Load a checkpoint's weights into `model` in place.

    Every tensor must match by name and shape, except the classifier when only
    its class count differs (n_pretrain_classes != the model's n_classes): then
    everything else loads and the model keeps its freshly initialised head.
    Anything else raises CheckpointMismatchError naming the first bad key, both
    shapes, and the setting to change.
    """
    ckpt = read_checkpoint(source, map_location=map_location)
    state = ckpt["state_dict"]
    target = _unwrap(model)
    head_prefix = _classifier_name(target) + "."
    own = target.state_dict()

    problems: list[tuple[str, tuple | None, tuple | None]] = []
    replace_head = False
    for key, tensor in own.items():
        if key not in state:
            # Files from before PyTorch 0.4.1 lack BN's counter; BN's loader fills it in.
            if not key.endswith("num_batches_tracked"):
                problems.append((key, None, tuple(tensor.shape)))
        elif state[key].shape != tensor.shape:
            if key.startswith(head_prefix) and state[key].shape[1:] == tensor.shape[1:]:
                replace_head = True
            else:
                problems.append((key, tuple(state[key].shape), tuple(tensor.shape)))
    problems += [(key, tuple(value.shape), None) for key, value in state.items() if key not in own]
    if problems:
        raise CheckpointMismatchError(_mismatch_message(_describe(source), target, ckpt.get("arch"), problems))

    n_pretrain_classes = state[head_prefix + "weight"].shape[0]
    if replace_head:
        state = {key: value for key, value in state.items() if not key.startswith(head_prefix)}
    target.load_state_dict(state, strict=not replace_head)
    return LoadedCheckpoint(
        arch=ckpt.get("arch"),
        epoch=ckpt.get("epoch"),
        n_pretrain_classes=int(n_pretrain_classes),
        head_replaced=replace_head,
    )


def checkpoint_state(model: nn.Module, **fields) -> dict:
    """Our checkpoint dict: {"arch", "model_kwargs", "state_dict", **fields}.

    `model` must come from `create_model` (wrappers such as DDP are looked
    through); `fields` are the engine's extras: epoch, optimizer, scheduler,
    best_metric, ... (tensors and plain containers only, see the module doc).
    """
    target = _unwrap(model)
    if not hasattr(target, "arch"):
        raise ValueError(
            f"{type(target).__name__} has no `arch`: build models with action3d.models.create_model so "
            f"their checkpoints can rebuild them"
        )
    return {"arch": target.arch, "model_kwargs": dict(target.model_kwargs), "state_dict": target.state_dict(), **fields}


def save_checkpoint(checkpoint: Mapping, path: str | os.PathLike) -> Path:
    """Write `checkpoint` to `path` atomically: a crash leaves the previous file or the new one, never half."""
    return atomic_write(path, lambda f: torch.save(dict(checkpoint), f))


def model_from_checkpoint(
    source: Source, *, n_classes: int | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a model from one of our checkpoints ("arch" + "model_kwargs") and load its weights.

    `n_classes`, when given and different from the checkpoint's, builds a fresh
    classifier of that size (fine-tuning from our own pretraining run).
    """
    ckpt = read_checkpoint(source, map_location=map_location)
    arch, kwargs = ckpt.get("arch"), ckpt.get("model_kwargs")
    if kwargs is None or not is_model(arch):
        raise ValueError(
            f"{_describe(source)} does not say how to rebuild its model (arch={arch!r}, "
            f"model_kwargs={'present' if kwargs is not None else 'absent'}); a file saved by the reference "
            f"code is like that. Build the model yourself, e.g. create_model('resnet50', shortcut_type='B', "
            f"n_classes=...), then call load_pretrained(model, path)."
        )
    kwargs = dict(kwargs)
    if n_classes is not None:
        kwargs["n_classes"] = n_classes
    model = create_model(arch, **kwargs)
    load_pretrained(model, ckpt)
    return model


def replace_classifier(model: nn.Module, n_classes: int) -> nn.Linear:
    """Swap the classifier for a fresh nn.Linear with `n_classes` outputs (same device and dtype)."""
    target = _unwrap(model)
    name = _classifier_name(target)
    old = getattr(target, name)
    new = nn.Linear(old.in_features, n_classes, device=old.weight.device, dtype=old.weight.dtype)
    setattr(target, name, new)
    if hasattr(target, "model_kwargs"):
        target.model_kwargs["n_classes"] = n_classes
    return new


class _FrozenNorm:
    """Mixin: a BatchNorm that stays in eval mode, so it normalises with its running
    statistics and never updates them, even when model.train() is called each epoch."""

    def train(self, mode: bool = True):
        return super().train(False)


class FrozenBatchNorm1d(_FrozenNorm, nn.BatchNorm1d):
    pass


class FrozenBatchNorm2d(_FrozenNorm, nn.BatchNorm2d):
    pass


class FrozenBatchNorm3d(_FrozenNorm, nn.BatchNorm3d):
    pass


_FROZEN = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d, nn.BatchNorm3d: FrozenBatchNorm3d}
_THAWED = {frozen: plain for plain, frozen in _FROZEN.items()}


def _set_frozen(stage: nn.Module, frozen: bool) -> None:
    for param in stage.parameters():
        param.requires_grad_(not frozen)
    for m in stage.modules():
        # Swapping the class (not the module) keeps state_dict keys, isinstance checks and hooks.
        if frozen and type(m) in _FROZEN:
            m.__class__ = _FROZEN[type(m)]
            m.train(False)
        elif not frozen and type(m) in _THAWED:
            m.__class__ = _THAWED[type(m)]
            m.train(stage.training)


def _named_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if hasattr(model, "named_stages"):
        return model.named_stages()
    return [(name, m) for name, m in model.named_children() if any(True for _ in m.parameters())]


def freeze_before(model: nn.Module, ft_begin_module: str | None) -> list[nn.Parameter]:
    """Train from `ft_begin_module` on and freeze everything before it, as the reference's option.

    'layer4' trains conv5_x and the classifier; 'fc' (or 'classifier', the same
    module in every family) the classifier alone; '' or None trains everything.
    Frozen parts get requires_grad=False, and their BatchNorms keep their running
    statistics and normalise with them, also after model.train(). Calling it again
    with another name re-freezes accordingly.

    Returns the trainable parameters, in model order, for the optimizer.
    """
    target = _unwrap(model)
    stages = _named_stages(target)
    names = [name for name, _ in stages]
    begin = 0
    if ft_begin_module:
        name = ft_begin_module
        if name not in names and name in ("fc", "classifier"):
            name = _classifier_name(target)
        if name not in names:
            arch = getattr(target, "arch", type(target).__name__)
            raise ValueError(
                f"ft_begin_module={ft_begin_module!r} is not a module of {arch}: choose one of "
                f"{', '.join(names)} (training starts there), or '' to train everything"
            )
        begin = names.index(name)
    for index, (_, stage) in enumerate(stages):
        _set_frozen(stage, index < begin)
    return [param for param in target.parameters() if param.requires_grad]
