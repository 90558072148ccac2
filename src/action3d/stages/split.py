"""Stage split: a data set in its official layout -> manifests (train/val/test CSV + classes.json + report.json) and
the slice lists the cache stage builds from (slices/<k>.csv: each video with its fingerprint).

The report's coverage (videos found and readable over videos listed, per subset) goes to an MLflow run of its own
with the manifests as its input datasets; under `split.min_coverage` the stage stops, naming the numbers.
"""

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
        min_coverage=s.min_coverage, slices=len(params.cache.slices),
    )  # fmt: skip
    print(report.summary())
    coverage = {f"coverage_{subset}": c["found"] / c["listed"] for subset, c in report.coverage.items()}
    _track(params, role, Path(out), report, coverage, ctx or RunContext())
    return {"classes": report.classes, **report.counts, "problems": report.problems, **coverage}


def _track(params: Params, role: str, out: Path, report, coverage: dict, ctx: RunContext) -> None:
    from action3d.project import tracking_uri
    from action3d.tracking.runs import start_stage_run

    counts = {f"{kind}_{subset}": c[kind] for subset, c in report.coverage.items() for kind in ("listed", "found")}
    with start_stage_run(
        f"split@{role}", experiment=params.tracking.experiment, tracking_uri=tracking_uri(),
        params={**{f"split.{k}": v for k, v in params.split.model_dump().items()},
                **{f"data.{role}.{k}": v for k, v in params.data[role].model_dump().items()}},
        params_hash=params.digest(), parent_run_id=ctx.parent_run_id, tags={"set": role, **ctx.tags},
    ) as run:  # fmt: skip
        ctx.run_id = run.run_id
        for subset in ("train", "val", "test"):
            if (out / f"{subset}.csv").is_file() and report.counts.get(subset):
                run.log_manifest(out / f"{subset}.csv", context=subset)
        run.log_metrics({**coverage, **counts, "problems": report.problems, "missing": len(report.missing),
                         "unreadable": len(report.unreadable)})
        run.log_artifact(out / "report.json")
