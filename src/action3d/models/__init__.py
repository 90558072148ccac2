"""The 3D CNN model zoo of Hara et al. behind a registry.

    from action3d.models import create_model, list_models
    model = create_model("resnet18", n_classes=101)

Importing this package registers every family (resnet, preact_resnet,
wide_resnet, resnext, densenet, r2plus1d).
"""

from . import densenet, preact_resnet, r2plus1d, resnet, resnext, wide_resnet  # noqa: F401  (registers models)
from .checkpoint import (
    CheckpointMismatchError,
    LoadedCheckpoint,
    checkpoint_state,
    freeze_before,
    load_pretrained,
    model_from_checkpoint,
    read_checkpoint,
    replace_classifier,
    save_checkpoint,
)
from .registry import create_model, is_model, list_models, model_family, register_model

__all__ = [
    "CheckpointMismatchError",
    "LoadedCheckpoint",
    "checkpoint_state",
    "create_model",
    "freeze_before",
    "is_model",
    "list_models",
    "load_pretrained",
    "model_family",
    "model_from_checkpoint",
    "read_checkpoint",
    "register_model",
    "replace_classifier",
    "save_checkpoint",
]
