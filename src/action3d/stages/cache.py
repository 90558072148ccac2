"""Stage cache: raw videos -> one frame pack per video at training resolution (parallel, resumable)."""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params

SUBSETS = ("train.csv", "val.csv", "test.csv")


def run(
    params: Params, *, manifests_dir: str | Path, data_root: str | Path, out_dir: str | Path,
    workers: int | None = None,
) -> dict:
    """Cache every video the manifests list. A second run skips what is done; unreadable and truncated videos are
    recorded (in cache_report.json, and counted in the metrics)."""
    from action3d.data import build_cache

    manifests = [Path(manifests_dir) / name for name in SUBSETS if (Path(manifests_dir) / name).is_file()]
    report = build_cache(manifests, data_root, out_dir, short_side=params.cache.short_side,
                         quality=params.cache.quality, min_frames=params.split.min_frames, workers=workers)
    print(report.summary())
    return {"videos": report.videos, "built": report.built, "unreadable": len(report.failed),
            "truncated": len(report.truncated), "bytes": report.bytes}
