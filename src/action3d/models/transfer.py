"""Transfer learning on a built model: a new classifier, and the early layers frozen as the paper fine-tunes.

    model = create_model("resnet50", n_classes=101, shortcut_type="B")
    load_pretrained(model, "r3d50_KM_200ep.pth")   # weights in (ours or the reference's), a fresh 101-class head
    trainable = freeze_before(model, "layer4")      # conv5_x and fc train, the rest is frozen

Also here: `check_fits` (does a checkpoint load into a model, read without its weights: the params check) and
`model_from_checkpoint` (rebuild one of our models from its checkpoint). Reading and writing the files themselves
is `action3d.checkpoint`'s one job; this module is not imported by `action3d.models` itself, so that building a
model never imports the checkpoint reader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from action3d.checkpoint import CheckpointError, CheckpointMismatchError, Source, read_checkpoint, source_name

from .registry import classifier_name, create_model, is_model, registry_name, unwrap_model


def replace_classifier(model: nn.Module, n_classes: int) -> nn.Linear:
    """Swap the classifier for a fresh nn.Linear with `n_classes` outputs (same device and dtype)."""
    target = unwrap_model(model)
    name = classifier_name(target)
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
    target = unwrap_model(model)
    stages = _named_stages(target)
    names = [name for name, _ in stages]
    begin = 0
    if ft_begin_module:
        name = ft_begin_module
        if name not in names and name in ("fc", "classifier"):
            name = classifier_name(target)
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


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_pretrained` found: the file's arch and epoch (None when absent), the class count of its
    classifier, and whether the model kept a fresh head."""

    arch: str | None
    epoch: int | None
    n_pretrain_classes: int
    head_replaced: bool


# --- weights into models: transfer and rebuild -------------------------------------------------------------------


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


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[tuple], bool]:
    """(the keys whose shapes differ between `model` and checkpoint `state`, as (key, checkpoint shape, model
    shape); whether only the classifier's class count differs, which fine-tuning replaces)."""
    head_prefix = classifier_name(model) + "."
    own = model.state_dict()
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
    return problems, replace_head


def check_fits(path: str | os.PathLike, model_name: str, model_kwargs: Mapping[str, Any], *, knob: str) -> None:
    """Raise CheckpointMismatchError unless checkpoint `path` loads into `model_name` built with `model_kwargs`
    (any class count): its `arch` names that model and its keys and shapes are the model's. Reads the keys and
    shapes, not the weights (the file is memory-mapped, the model built on the meta device); `knob` is the params
    key that names the file, for the message."""
    try:
        ckpt = read_checkpoint(path, mmap=True)
    except CheckpointError as err:
        raise CheckpointError(f"{knob}: {err}") from None
    named = registry_name(ckpt.get("arch"))
    if named is not None and named != model_name:
        raise CheckpointMismatchError(f"{knob} ({path}) is a {ckpt['arch']} (its 'arch'), but model.name is "
                                      f"{model_name}: set model.name: {named}, or give a {model_name} checkpoint")
    with torch.device("meta"):
        model = create_model(model_name, **{k: v for k, v in model_kwargs.items() if k != "n_classes"})
    problems, _ = _fit(model, ckpt["state_dict"])
    if problems:
        raise CheckpointMismatchError(f"{knob}: " + _mismatch_message(str(path), model, ckpt.get("arch"), problems))


def load_pretrained(
    model: nn.Module, source: Source, *, map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Load a checkpoint's weights into `model` in place, for transfer learning.

    Every tensor must match by name and shape, except the classifier when only its class count differs
    (n_pretrain_classes != the model's n_classes): then everything else loads and the model keeps its freshly
    initialised head. Anything else raises CheckpointMismatchError naming the first bad key, both shapes, and the
    setting to change.
    """
    ckpt = read_checkpoint(source, map_location=map_location)
    state = ckpt["state_dict"]
    target = unwrap_model(model)
    head_prefix = classifier_name(target) + "."
    problems, replace_head = _fit(target, state)
    if problems:
        raise CheckpointMismatchError(_mismatch_message(source_name(source), target, ckpt.get("arch"), problems))

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


def model_from_checkpoint(
    source: Source, *, n_classes: int | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a model from one of our checkpoints ("arch" + "model_kwargs") and load its weights.

    `n_classes`, when given and different from the checkpoint's, builds a fresh classifier of that size
    (fine-tuning from our own pretraining run).
    """
    ckpt = read_checkpoint(source, map_location=map_location)
    arch, kwargs = ckpt.get("arch"), ckpt.get("model_kwargs")
    if kwargs is None or not isinstance(arch, str) or not is_model(arch):
        raise CheckpointError(
            f"{source_name(source)} does not say how to rebuild its model (arch={arch!r}, "
            f"model_kwargs={'present' if kwargs is not None else 'absent'}): expected an action3d checkpoint "
            f"(model.pt written by a training stage). A file saved by 3D-ResNets-PyTorch is like that: build the "
            f"model yourself, e.g. create_model('resnet50', shortcut_type='B', n_classes=...), then call "
            f"load_pretrained(model, path) (the pipeline does that for finetune.pretrained)."
        )
    kwargs = dict(kwargs)
    if n_classes is not None:
        kwargs["n_classes"] = n_classes
    model = create_model(arch, **kwargs)
    load_pretrained(model, ckpt)
    return model
