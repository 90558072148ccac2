"""The training pipeline as a Prefect flow over `dvc repro`: schedules, retries and workers around the one DAG.

    python flows/pipeline.py                              # one run now, on Prefect's ephemeral API (no server)
    python flows/pipeline.py -S finetune.lr=0.003         # with overrides, as `dvc exp run -S`
    python flows/pipeline.py --target finetune            # a stage and what it needs, nothing else

dvc.yaml stays the only description of stages, paths and dependencies. Each stage is a task that runs
`dvc repro STAGE`: DVC skips it when up to date, records dvc.lock and caches the outputs. With a DVC remote
(`action3d remote setup s3://...`), a fresh worker pulls exactly what its stages need (`dvc repro --pull`), and
the run is saved and pushed as a DVC experiment (`dvc exp save` + `dvc exp push origin`): `dvc exp pull origin NAME`
and `dvc exp show` on a laptop list it beside every other scheduled run. A training task killed mid-epoch is
retried and resumes from its last checkpoint (mirrored to `storage.checkpoints` on S3, restored on a fresh worker).

Deployments (schedules, the GPU work pool) are in prefect.yaml; the README's "Scheduled runs" section has the
commands.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

# A worker runs the flow in a fresh clone: the code of that revision, not of whatever the worker's venv installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import deployment  # noqa: E402

from action3d.workspace import Workspace  # noqa: E402


@task(name="preflight")
def preflight(root: str, overrides: list[str], targets: list[str], revision: str | None, remote: bool) -> list[str]:
    """Everything the run needs, before any work: the revision, params + overrides, the stages, the DVC remote, and
    (deployed, in a worker's temporary clone) a tracking store that outlives the clone."""
    ws = Workspace(root)
    if deployment.id:
        print(f"tracking into {ws.check_tracking_store()}")
    if revision:
        print(f"checked out {revision} = {ws.checkout(revision)}")
    stages = ws.check(overrides=overrides, targets=targets, remote=remote)
    ws.set_params(overrides)
    return stages


@task(name="repro", task_run_name="{stage}")
def repro(root: str, stage: str, pull: bool) -> list[str]:
    """`dvc repro STAGE`: nothing when DVC says it is up to date; a rerun of a killed training stage resumes."""
    ran = Workspace(root).repro(stage, pull=pull, single=True)  # the flow runs the stages in order
    print(f"{stage}: {'ran ' + ', '.join(ran) if ran else 'up to date, not run'}")
    return ran


@task(name="publish")
def publish(root: str, experiment: str, stages: list[str], push: bool) -> dict:
    """Save the workspace as a DVC experiment; push it (git ref to origin, outputs to the DVC remote)."""
    ws = Workspace(root)
    ws.save_experiment(experiment, stages)
    if push:
        if ws.has_git_remote("origin"):
            ws.push_experiment(experiment)
        else:
            ws.run("dvc", "push")
    metrics = ws.metrics()
    create_markdown_artifact(key="pipeline-metrics", markdown=_metrics_markdown(experiment, ws.commit(), metrics),
                             description=f"DVC experiment {experiment}")
    return metrics


def _metrics_markdown(experiment: str, commit: str, metrics: dict) -> str:
    rows = "\n".join(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                     for key, value in metrics.items())
    return (f"### DVC experiment `{experiment}` (on commit `{commit[:10]}`)\n\n| metric | value |\n| --- | --- |\n"
            f"{rows}\n\n`dvc exp pull origin {experiment}` then `dvc exp show` to compare it with other runs.")


def _default_experiment() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{deployment.name or 'pipeline'}-{stamp}"


@flow(name="action3d-pipeline", log_prints=True)
def pipeline(
    overrides: list[str] | None = None,
    targets: list[str] | None = None,
    experiment: str | None = None,
    revision: str | None = None,
    remote: bool | None = None,
    root: str = ".",
    retries: int = 2,
    retry_delay_seconds: float = 30.0,
) -> dict:
    """Run the DVC pipeline (or `targets` and what they need) with `overrides`, as a DVC experiment.

    `remote`: pull inputs from and push outputs to the DVC remote; None = when one is configured, True = it must be
    (a worker's deployment sets it, so a missing remote stops the run before any training). `revision`: a git
    branch, tag or commit to check out first. `experiment`: the DVC experiment's name (default: the deployment's
    name and the time). A stage that fails is retried `retries` times; training resumes from its checkpoint.
    """
    overrides, targets = list(overrides or []), list(targets or [])
    ws = Workspace(root)
    use_remote = ws.remote() is not None if remote is None else remote
    stages = preflight(root, overrides, targets, revision, use_remote)
    step = repro.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    ran = [name for stage in stages for name in step(root, stage, use_remote)]
    metrics = publish(root, experiment or _default_experiment(), stages, use_remote)
    return {"stages_run": ran, "metrics": metrics}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a knob")
    parser.add_argument("--target", action="append", default=[], help="a stage of dvc.yaml (repeatable)")
    parser.add_argument("--name", default=None, help="the DVC experiment's name")
    parser.add_argument("--revision", default=None, help="git branch, tag or commit to check out first")
    parser.add_argument("--root", default=".", help="the project folder (where dvc.yaml is)")
    args = parser.parse_args()
    from action3d.errors import Action3dError

    try:
        pipeline(overrides=args.set, targets=args.target, experiment=args.name, revision=args.revision,
                 root=args.root)
    except Action3dError as err:  # bad input: the message says what to fix; Prefect's log has the details
        sys.exit(f"action3d: error: {err}")
