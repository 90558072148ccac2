"""Stage cache: raw videos -> one frame pack per video at training resolution (parallel, resumable)."""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params, Role
from action3d.stages import RunContext

SUBSETS = ("train.csv", "val.csv", "test.csv")


def run(params: Params, *, role: Role, manifests: str | Path, out: str | Path, ctx: RunContext | None = None) -> dict:
    """Cache every video the manifests of data.<role> list. A second run skips what is done; unreadable and
    truncated videos are recorded (in cache_report.json, and counted in the metrics)."""
    from action3d.data import build_cache

    listed = [Path(manifests) / name for name in SUBSETS if (Path(manifests) / name).is_file()]
    report = build_cache(listed, params.data[role].path, out, short_side=params.cache.short_side,
                         quality=params.cache.quality, min_frames=params.split.min_frames)
    print(report.summary())
    return {"videos": report.videos, "built": report.built, "unreadable": len(report.failed),
            "truncated": len(report.truncated), "bytes": report.bytes}
