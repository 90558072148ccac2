"""The 3D CNN model zoo of Hara et al. behind a registry.

    from action3d.models import create_model, list_models
    model = create_model("resnet18", n_classes=101)

Importing this package registers every family (resnet, preact_resnet,
wide_resnet, resnext, densenet, r2plus1d), and imports torch alone.
Checkpoint files (reading, writing) live in `action3d.checkpoint`; weights
into a built model (`load_pretrained`, `check_fits`, `model_from_checkpoint`)
and the fine-tuning steps (`freeze_before`, `replace_classifier`) in
`action3d.models.transfer`.
"""

from . import densenet, preact_resnet, r2plus1d, resnet, resnext, wide_resnet  # noqa: F401  (registers models)
from .registry import classifier_name, create_model, is_model, list_models, model_family, register_model

__all__ = [
    "classifier_name",
    "create_model",
    "is_model",
    "list_models",
    "model_family",
    "register_model",
]
