"""Stage split: a data set in its official layout -> manifests (train/val/test CSV + classes.json + report.json)."""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params, Role
from action3d.stages import RunContext


def run(params: Params, *, role: Role, out: str | Path, ctx: RunContext | None = None) -> dict:
    """Parse the set data.<role> (its path, in its layout); print what the validation found."""
    from action3d.data import build_manifests

    s, source = params.split, params.data[role]
    report = build_manifests(
        source.layout, source.path, out, split=s.split, val_fraction=s.val_fraction, test_fraction=s.test_fraction,
        seed=s.seed, probe=s.probe, min_frames=s.min_frames, allow_leakage=s.allow_leakage,
    )  # fmt: skip
    print(report.summary())
    return {"classes": report.classes, **report.counts, "problems": report.problems}
