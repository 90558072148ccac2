"""Stage split: a dataset in its official layout -> manifests (train/val/test CSV + classes.json + report.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from action3d.config import Params


def run(
    params: Params,
    *,
    role: Literal["pretrain", "finetune"],
    data_root: str | Path,
    out_dir: str | Path,
    annotations: str | Path | None = None,
    workers: int | None = None,
) -> dict:
    """Parse `data_root` in the layout `split.<role>_layout` names; print what the validation found.

    `annotations`: where the split files live when not inside `data_root` (e.g. UCF-101's ucfTrainTestlist/).
    """
    from action3d.data import build_manifests

    s = params.split
    report = build_manifests(
        getattr(s, f"{role}_layout"), data_root, out_dir, split=s.split, annotations=annotations,
        val_fraction=s.val_fraction, test_fraction=s.test_fraction, seed=s.seed, probe=s.probe,
        min_frames=s.min_frames, allow_leakage=s.allow_leakage, workers=workers,
    )  # fmt: skip
    print(report.summary())
    return {"classes": report.classes, **report.counts, "problems": report.problems}
