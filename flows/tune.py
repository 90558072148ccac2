"""Hyperparameter tuning as a Prefect flow: `n_workers` tuning processes on one Optuna study, then the best trial.

    python flows/tune.py --n-workers 2                  # on Prefect's ephemeral API, the study of params.yaml
    prefect deployment run action3d-tune/tune -p n_workers=4

The study lives in `tune.storage` (a journal file by default; a PostgreSQL URL when workers run on several
machines). A flow run with `join=True` adds its workers to a study another run leads, e.g. on a second GPU machine
of the pool; the leading run waits for its own workers, then records and reports the best trial.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the clone's code (see flows/pipeline.py)

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import deployment  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from action3d import tune as tuning  # noqa: E402
from action3d.project import slug  # noqa: E402
from action3d.workspace import Workspace  # noqa: E402


@task(name="tuning worker", task_run_name="worker {index}", retries=1, retry_delay_seconds=10)
def worker(root: str, overrides: list[str], parent_run_id: str | None, index: int) -> int:
    """One `action3d tune --worker` process: trials until the study has enough. A retry re-queues the trial its
    predecessor was running (its process is gone) and resumes it from its checkpoint."""
    ws = Workspace(root)
    ws.extra_env.update(tuning.worker_gpu_env(index))  # one GPU per worker when there are GPUs
    setup = tuning.setup(ws.root / "params.yaml", overrides)
    return ws.run("action3d", *tuning.worker_argv(setup, index, parent_run_id), echo=True).returncode


@flow(name="action3d-tune", log_prints=True)
def tune(n_workers: int = 2, overrides: list[str] | None = None, join: bool = False, apply: bool = False,
         root: str = ".") -> dict:
    overrides = list(overrides or [])
    ws = Workspace(root)
    if deployment.id:  # a worker's temporary clone: its runs must go to a store that outlives it
        ws.check_tracking_store()
    setup = tuning.setup(ws.root / "params.yaml", overrides)
    upstream = ws.stages([setup.tune.target])[:-1]  # a fresh worker's clone: the target's inputs, pulled or made
    pull = ws.remote() is not None
    for stage in upstream:
        ws.repro(stage, pull=pull, single=True)
    tuning.preflight(setup)
    with ThreadPoolTaskRunner(max_workers=n_workers) as runner:
        if join:
            # worker numbers past the lead's, so that their samplers draw other knobs
            offset = 100 + (os.getpid() % 900)
            for future in [runner.submit(worker, {"root": root, "overrides": overrides, "parent_run_id": None,
                                                  "index": offset + i}) for i in range(n_workers)]:
                future.result()
            return {"joined": setup.study_name}
        with tuning.parent_run(setup) as parent:
            futures = [runner.submit(worker, {"root": root, "overrides": overrides, "parent_run_id": parent.run_id,
                                              "index": i}) for i in range(n_workers)]
            for future in futures:
                future.result()
            result = tuning.summarise(setup, parent, apply=apply)
    create_markdown_artifact(key=slug(f"tune-{setup.study_name}"), markdown=(
        f"### Optuna study `{result['study']}`\n\nbest trial {result['best_trial']}: {setup.tune.metric} = "
        f"{result['best_value']:.4g}\n\ntrials: {result['trials']}\n\nreproduce: `{result['dvc_exp_run']}`\n"))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--join", action="store_true", help="add workers to a study another run leads")
    parser.add_argument("--apply", action="store_true", help="write the best knobs into params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args()
    from action3d.errors import Action3dError

    try:
        tune(n_workers=args.n_workers, overrides=args.set, join=args.join, apply=args.apply, root=args.root)
    except Action3dError as err:
        sys.exit(f"action3d: error: {err}")
