"""Stage cache: one slice of a set's raw videos -> training-ready shards (frame packs, many videos per file).

The split stage lists each slice's videos with their fingerprints (slices/<k>.csv); this stage depends on that
file alone, so a changed video rebuilds its slice, not the set, and each slice can be built on another machine
(`dvc repro cache@<role>-<k>`, or flows/cache.py on a work pool). Parallel over the cores, resumable.
"""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params, Role
from action3d.stages import RunContext


def run(params: Params, *, role: Role, videos: str | Path, out: str | Path, ctx: RunContext | None = None) -> dict:
    """Cache the videos of data.<role> that `videos` lists into `out`. A second run after a crash reuses what is
    done; unreadable and truncated videos are recorded (in index.csv and cache_report.json, counted here)."""
    from action3d.data.annotations import read_slice
    from action3d.data.cache import build_slice

    c = params.cache
    report = build_slice(read_slice(videos), params.data[role].path, out, slices=len(c.slices),
                         short_side=c.short_side, quality=c.quality, shard_mb=c.shard_mb,
                         min_frames=params.split.min_frames)
    print(report.summary())
    return {"videos": report.videos, "built": report.built, "shards": report.shards,
            "unreadable": len(report.failed), "truncated": len(report.truncated), "bytes": report.bytes}
