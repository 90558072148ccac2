"""The model registry: one name per network, builders registered by a decorator.

    @register_model
    def resnet18(**kwargs) -> ResNet:
        return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)

    model = create_model("resnet18", n_classes=101)

A model built by `create_model` remembers what rebuilds it: `model.arch` (the
registry name) and `model.model_kwargs` (the keyword arguments that were given,
``None`` values dropped). Checkpoints store both (see `action3d.checkpoint`).
Every family names its classifier module in the class attribute
`classifier_name` ("fc", or "classifier" for DenseNet): `classifier_name(model)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn
from torch.nn.parallel import DistributedDataParallel

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `builder` under its function name; a name registered twice is an error."""
    name = builder.__name__
    if name in _MODELS:
        other = _MODELS[name]
        raise ValueError(
            f"model name {name!r} is registered twice: {other.__module__}.{other.__qualname__} "
            f"and {builder.__module__}.{builder.__qualname__}; rename one of them"
        )
    _MODELS[name] = builder
    return builder


def _natural_key(name: str) -> list[str | int]:
    # "resnet18" before "resnet101": compare digit runs as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models() -> list[str]:
    """Every registered name, families alphabetically, depths ascending."""
    return sorted(_MODELS, key=_natural_key)


def is_model(name: str) -> bool:
    return name in _MODELS


def model_family(name: str) -> str:
    """The family of a registered model: the module that defines it ('resnet', 'densenet', ...)."""
    return _builder(name).__module__.rsplit(".", 1)[-1]


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name`.

    Keyword arguments equal to None are dropped so the builder's defaults stand
    (callers can pass optional settings straight through). The result carries
    `arch` and `model_kwargs` so that `create_model(model.arch, **model.model_kwargs)`
    builds the same network again.
    """
    builder = _builder(name)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    model = builder(**kwargs)
    model.arch = name
    model.model_kwargs = dict(kwargs)
    return model


def classifier_name(model: nn.Module) -> str:
    """The attribute name of the model's classifier ("fc", "classifier"): the head that transfer learning swaps."""
    name = getattr(model, "classifier_name", None)
    if name is None:
        raise TypeError(
            f"{type(model).__name__} has no `classifier_name` attribute naming its classifier module; "
            f"models built by action3d.models.create_model have one"
        )
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside DataParallel / DistributedDataParallel / torch.compile wrappers (its state_dict
    keys carry no prefixes)."""
    while True:
        if isinstance(model, (nn.DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


# 3D-ResNets-PyTorch writes `arch` as "<model>-<depth>" (opts.py: model, model_depth): our registry's name for each
_REFERENCE_FAMILIES = {"resnet": "resnet", "preresnet": "preact_resnet", "wideresnet": "wide_resnet",
                       "resnext": "resnext", "densenet": "densenet", "resnet2p1d": "r2plus1d"}


def registry_name(arch: str | None) -> str | None:
    """Our model name for a checkpoint's `arch`: ours as it is, the reference's "resnet-18" as "resnet18"; None
    when the file names none we know."""
    if not isinstance(arch, str):
        return None
    if is_model(arch):
        return arch
    family, _, depth = arch.lower().rpartition("-")
    name = f"{_REFERENCE_FAMILIES.get(family, family)}{depth}"
    return name if is_model(name) else None
