"""Stage pretrain: the model of `model` trained from scratch on the large set (the paper's Kinetics step)."""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params


def run(params: Params, *, manifests_dir: str | Path, cache_dir: str | Path, out_dir: str | Path) -> dict:
    from action3d.data import read_classes
    from action3d.engine import seed_everything
    from action3d.models import create_model
    from action3d.stages.training import train_stage

    classes = read_classes(Path(manifests_dir) / "classes.json")
    seed_everything(params.seed)  # the initial weights are part of the run: same seed, same model
    model = create_model(params.model.name, n_classes=len(classes), **params.model.kwargs)
    return train_stage(
        params, stage="pretrain", model=model, trainable=None, train_cfg=params.pretrain,
        optimizer_cfg=params.pretrain, manifests_dir=manifests_dir, cache_dir=cache_dir, out_dir=out_dir,
    )  # fmt: skip
