"""Stage scratch: the baseline of the paper's transfer question (RQ3) — the same network, from random weights,
trained on the small set with its own knobs (`scratch` in params.yaml), for as many epochs as fine-tuning.

A gain of fine-tuning over this baseline means something only when the baseline fits its training set: the stage
reports its last epoch's training accuracy beside its validation accuracy (README: how its knobs were chosen).
"""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params


def run(params: Params, *, manifests_dir: str | Path, cache_dir: str | Path, out_dir: str | Path) -> dict:
    from action3d.stages.training import train_from_scratch

    return train_from_scratch(params, stage="scratch", train_cfg=params.scratch, manifests_dir=manifests_dir,
                              cache_dir=cache_dir, out_dir=out_dir, tags={"init": "scratch"})
