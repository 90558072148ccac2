"""Transfer learning on a built model: a new classifier, and the early layers frozen as the paper fine-tunes.

    model = create_model("resnet50", n_classes=101, shortcut_type="B")
    load_pretrained(model, "r3d50_KM_200ep.pth")   # action3d.checkpoint: weights in, a fresh 101-class head
    trainable = freeze_before(model, "layer4")      # conv5_x and fc train, the rest is frozen

Not imported by `action3d.models` itself: this module uses `action3d.checkpoint`, which uses the registry.
"""

from __future__ import annotations

from torch import nn

from action3d.checkpoint import unwrap_model

from .registry import classifier_name


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
