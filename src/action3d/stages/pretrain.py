"""Stage pretrain: the model of `model` trained from scratch on the large set (the paper's Kinetics step)."""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params


def run(params: Params, *, manifests_dir: str | Path, cache_dir: str | Path, out_dir: str | Path) -> dict:
    from action3d.stages.training import train_from_scratch

    return train_from_scratch(params, stage="pretrain", train_cfg=params.pretrain, manifests_dir=manifests_dir,
                              cache_dir=cache_dir, out_dir=out_dir)
