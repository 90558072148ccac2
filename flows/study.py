"""The architecture study as a Prefect flow: the pipeline once per model of params.yaml's `study.entries`.

    python flows/study.py                                  # every entry of params.yaml, on the ephemeral API
    python flows/study.py --entry r10=model.name=resnet10 --entry r18=model.name=resnet18  # one's own entries

Entries run as parallel tasks, at most `study.parallel` at once (auto: one per visible GPU, each entry pinned to
its own GPU; 1 on CPU). Each runs `dvc repro` of `study.targets` in its own clone of the repository (committed
HEAD) and comes back as the DVC experiment `<study>-<entry>`. The table (model, params, GFLOPs, fine-tuned and
scratch video top-1/top-5, clip top-1, time) lands in reports/study/<study>.csv and .png, in an MLflow run
`study-<study>`, and as the Prefect artifact `study-<study>`. A failed entry is a failed row, not a failed study.
"""

from __future__ import annotations

import argparse
import queue
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the clone's code (see flows/pipeline.py)

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import deployment  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from action3d import study as studies  # noqa: E402
from action3d.config import Params, load_params  # noqa: E402
from action3d.project import slug  # noqa: E402
from action3d.workspace import Workspace  # noqa: E402


@task(name="entry", task_run_name="{entry}", cache_policy=NO_CACHE)
def run_entry(root: str, name: str, entry: str, params: Params, overrides: list[str], targets: list[str],
              gpus: queue.Queue | None, tracking_uri: str, study_run_id: str) -> dict:
    """One entry (`params`: its knobs, checked before the study started), on a GPU of its own when there are GPUs:
    its row of the table."""
    project = Workspace(root)
    gpu = gpus.get() if gpus is not None else None
    try:
        row = studies.run_entry(project, name, entry, params, overrides, targets, gpu=gpu, tracking_uri=tracking_uri,
                                study_run_id=study_run_id)
    finally:
        if gpu is not None:
            gpus.put(gpu)
    print(f"{entry}: {row['status']}" + (f" ({row.get('error')})" if row["status"] != "ok" else
                                         f", fine-tuned video top-1 {row.get('finetune.video_top1')}"))
    return row


@flow(name="action3d-study", log_prints=True)
def study(entries: dict[str, list[str]] | None = None, name: str = "architecture", parallel: int | None = None,
          targets: list[str] | None = None, root: str = ".") -> list[dict]:
    """Run every entry (default: params.yaml's study.entries) and collect the comparison table."""
    from action3d.distributed import visible_gpus
    from action3d.plots import plot_study
    from action3d.project import tracking_uri
    from action3d.tracking.runs import create_parent_run, finish_run, log_study_table

    project = Workspace(root)
    if deployment.id:  # a worker's temporary clone: its runs must go to a store that outlives it
        project.check_tracking_store()
    params = load_params(project.root / "params.yaml")
    chosen = studies.study_entries(params, entries)
    targets = list(targets or params.study.targets)
    checked = studies.check_entries(project.root / "params.yaml", chosen)  # every entry, before any runs
    project.check(targets=targets)
    slots = studies.parallel_slots(parallel or params.study.parallel)
    gpus = visible_gpus()
    free = None
    if gpus:
        free = queue.Queue()
        for gpu in gpus[:slots]:
            free.put(gpu)
    uri = tracking_uri(project.root)  # every entry's clone records its runs in the project's store
    if slots > 1 and uri.startswith("sqlite:"):
        raise studies.StudyError(f"{slots} entries at once would write to one sqlite file ({uri}) from many "
                                 "processes: start an MLflow server and set MLFLOW_TRACKING_URI, or set study.parallel: 1")
    study_run = create_parent_run(f"study-{name}", experiment=params.tracking.experiment, tracking_uri=uri,
                                  tags={"stage": "study", "study": name}, repo_dir=project.root)
    print(f"study {name}: {len(checked)} entries, {slots} at a time" + (f" on GPUs {gpus[:slots]}" if gpus else ""))

    with ThreadPoolTaskRunner(max_workers=slots) as runner:
        futures = [runner.submit(run_entry, {"root": root, "name": name, "entry": entry, "params": checked[entry],
                                             "overrides": overrides,
                                             "targets": targets, "gpus": free, "tracking_uri": uri,
                                             "study_run_id": study_run.run_id})
                   for entry, overrides in chosen.items()]
        rows = [future.result() for future in futures]

    out = project.root / "reports" / "study"
    csv_path = studies.write_table(rows, out / f"{name}.csv")
    plot_path = out / f"{name}.png"
    plot_study(rows, plot_path, title=f"study {name}")
    table = studies.markdown_table(name, rows)
    log_study_table(study_run, rows, files=[csv_path, plot_path])
    finish_run(study_run)
    if project.has_git_remote("origin") and project.remote() is not None:  # a worker's clone: send them home
        for row in rows:
            if row["status"] == "ok":
                project.push_experiment(row["experiment"])
    create_markdown_artifact(key=slug(f"study-{name}"), markdown=table,
                             description=f"architecture study {name}")
    print(table)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE...]",
                        help="an entry of one's own instead of params.yaml's (repeatable)")
    parser.add_argument("--name", default="architecture", help="the study's name (experiments <name>-<entry>)")
    parser.add_argument("--parallel", type=int, default=None, help="entries at once (default: study.parallel)")
    parser.add_argument("--target", action="append", default=[], help="stage each entry runs (default: study.targets)")
    parser.add_argument("--root", default=".", help="the project folder (where dvc.yaml is)")
    args = parser.parse_args()
    own = {spec.split("=", 1)[0]: spec.split("=", 1)[1].split(";") for spec in args.entry} or None
    from action3d.errors import Action3dError

    try:
        study(entries=own, name=args.name, parallel=args.parallel, targets=args.target or None, root=args.root)
    except Action3dError as err:
        sys.exit(f"action3d: error: {err}")
