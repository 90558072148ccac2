"""Data: the demo generator, dataset layouts -> manifests, the frame-pack cache, transforms and loaders.

    synthetic    synth_kinetics, synth_ucf101, synth_hmdb51       demo videos in the official layouts
    annotations  build_manifests, read_manifest, read_classes     UCF-101 / HMDB-51 / Kinetics / folder -> manifests
    cache        build_cache, FramePack                           raw videos -> one frame pack per video
    transforms   TrainPreset, EvalPreset                          the paper's crops, flip, normalisation
    loaders      make_train_loader, make_eval_loader              DataLoaders of clip dicts

The names are importable from here; each submodule is imported on first use (torch and PyAV load only when needed).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "synth_kinetics": "synthetic",
    "synth_ucf101": "synthetic",
    "synth_hmdb51": "synthetic",
    "build_manifests": "annotations",
    "read_manifest": "annotations",
    "read_classes": "annotations",
    "AnnotationError": "annotations",
    "SplitReport": "annotations",
    "build_cache": "cache",
    "FramePack": "cache",
    "CacheReport": "cache",
    "TrainPreset": "transforms",
    "EvalPreset": "transforms",
    "make_train_loader": "loaders",
    "make_eval_loader": "loaders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'action3d.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"action3d.data.{_EXPORTS[name]}"), name)
