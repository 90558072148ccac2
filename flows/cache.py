"""A set's frame cache built by many workers at once: one slice per worker, recorded by DVC as one machine's build.

    python flows/cache.py --role pretrain                # here: the slices come from the work pool's workers

The cache of data.<role> is K slices (params.yaml `cache.slices: [0, ..., K-1]`; dvc.yaml's stages
cache@<role>-<k>), each a stage of its own that depends on its own list of videos. This flow:

1. here: `dvc repro split@<role>` (the manifests and each slice's list), saved as the DVC experiment
   `<name>-split` and pushed: its git ref to origin, its outputs and run cache to the DVC remote;
2. on the pool, one flow run per slice (deployment `cache-slice`, `cache_slice` below): a worker checks out that
   experiment, pulls the slice's list and the slice's raw videos alone (not the set), runs
   `dvc repro --single-item cache@<role>-<k>` and pushes its outputs and DVC's run cache. A slice whose worker
   died is run again, alone (`retries`);
3. here: `dvc repro --pull` of every slice: DVC finds each in its run cache, fetches its outputs and writes dvc.lock
   without running anything, exactly as if this machine had built them; saved as the experiment `<name>` and
   pushed. Anywhere: `dvc exp pull origin <name>`, `dvc exp branch <name> <branch>`, `git checkout <branch>`,
   `dvc pull cache@<role>-0 ...`: its dvc.lock and data, with nothing left for `dvc repro` to run.

The shards of a slice are a function of its videos and the knobs: any worker builds the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the clone's code (see flows/pipeline.py)

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402

from action3d.config import load_params  # noqa: E402
from action3d.workspace import Workspace, WorkspaceError  # noqa: E402

SLICE_DEPLOYMENT = "action3d-cache-slice/cache-slice"


@flow(name="action3d-cache-slice", log_prints=True)
def cache_slice(role: str, slice: int, revision: str, root: str = ".") -> dict:
    """On a worker: build slice `slice` of data.<role> from the experiment `revision` (the split's), push it."""
    ws = Workspace(root)
    ws.check_remote()
    print(f"checked out {revision} = {ws.checkout(revision)}")
    params = load_params(ws.root / "params.yaml")
    videos = ws.root / "data" / "splits" / role / "slices" / f"{slice}.csv"
    ws.run("dvc", "pull", "--quiet", "runs/params.ok", str(videos.relative_to(ws.root)))  # the stage's inputs
    from action3d.data.annotations import read_slice

    listed = read_slice(videos)
    for start in range(0, len(listed), 500):  # this slice's videos (or their tar files), not the set
        ws.run("dvc", "pull", "--quiet", *raw_files(ws.root, params.data[role].path, listed[start:start + 500]))
    stage = f"cache@{role}-{slice}"
    ran = ws.repro(stage, single=True)
    ws.run("dvc", "push", "--run-cache", stage)
    print(f"{stage}: {len(listed)} videos, {'built' if ran else 'up to date'}; pushed with its run cache")
    return {"stage": stage, "videos": len(listed), "ran": bool(ran)}


def raw_files(root: Path, data_path: str, videos: list[str]) -> list[str]:
    """The files to pull for `videos` of the set at `data_path`: the videos, or the tars of a packed set that hold
    them (its index pulled first)."""
    from action3d.data import raw

    index = (Path(data_path) / raw.INDEX).as_posix()
    Workspace(root).run("dvc", "pull", "--quiet", index, check=False)  # not a packed set: not tracked, no file
    packed = raw.packed_index(str(root / data_path))
    if packed is None:
        return [(Path(data_path) / v).as_posix() for v in videos]
    return sorted({(Path(data_path) / raw.TARS / packed[v].tar.name).as_posix() for v in videos if v in packed})


@task(name="slice", task_run_name="{role}-{slice}", cache_policy=NO_CACHE)
def build_on_pool(role: str, slice: int, revision: str, retries: int, deployment_name: str) -> str:
    """One slice on a worker of the pool; run again (alone) when its worker died or it failed."""
    for attempt in range(retries + 1):
        run = run_deployment(deployment_name, parameters={"role": role, "slice": slice, "revision": revision},
                             flow_run_name=f"cache-{role}-{slice}-{attempt}", as_subflow=False, timeout=None,
                             poll_interval=2)
        if run.state.is_completed():
            return run.name
        print(f"slice {slice} of {role}: flow run {run.name} ended {run.state.name}"
              + (", running it again" if attempt < retries else ""))
    raise WorkspaceError(f"slice {slice} of {role} failed {retries + 1} times (the last: {run.name}, "
                         f"{run.state.name}); see its logs in Prefect, fix, and run this flow again: the slices "
                         "already built come back from DVC's run cache")


@flow(name="action3d-cache", log_prints=True)
def cache(role: str = "pretrain", experiment: str | None = None, revision: str | None = None, root: str = ".",
          retries: int = 2, deployment_name: str = SLICE_DEPLOYMENT) -> dict:
    """Build data.<role>'s cache on the pool, one slice per flow run; record it here as DVC would, push it."""
    ws = Workspace(root)
    if commit := ws.ready_for_pool(revision):
        print(f"checked out {revision} = {commit}")
    params = load_params(ws.root / "params.yaml")
    if role not in params.data:
        raise WorkspaceError(f"no data.{role} in params.yaml; the sets are: {', '.join(params.data)}")
    name = experiment or f"cache-{role}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    slices = [f"cache@{role}-{k}" for k in params.cache.slices]

    split = f"split@{role}"
    ws.repro(split, pull=True)
    # its outputs and the raw videos (a stage's, or `dvc add`ed), for the workers to pull what their slice needs
    ws.run("dvc", "push", "--run-cache", *ws.stages([split]), params.data[role].path)
    ws.save_experiment(f"{name}-split", [split])
    ws.push_experiment(f"{name}-split")
    base = ws.experiment_ref(f"{name}-split")

    with ThreadPoolExecutor(len(slices)) as pool:  # each slice waits on its flow run; the workers do the work
        futures = [pool.submit(build_on_pool, role, k, base, retries, deployment_name) for k in params.cache.slices]
        runs = [f.result() for f in futures]

    for stage in slices:  # from DVC's run cache: nothing runs here, the outputs are fetched, dvc.lock written
        if ws.repro(stage, pull=True, single=True):
            raise WorkspaceError(f"{stage} ran here instead of coming back from the run cache its worker pushed")
    ws.save_experiment(name, [split, *slices])
    ws.push_experiment(name)
    print(f"{role}: {len(slices)} slice(s) built on the pool ({', '.join(runs)}); DVC experiment {name} pushed: "
          f"`dvc exp pull origin {name}`, `dvc exp branch {name} <branch>`, then `dvc pull` its stages there")
    return {"experiment": name, "slices": slices, "flow_runs": runs}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="pretrain", help="the set: a key of params.yaml's data")
    parser.add_argument("--name", default=None, help="the DVC experiment's name")
    parser.add_argument("--revision", default=None, help="git branch, tag or commit to check out first")
    parser.add_argument("--root", default=".", help="the project folder (where dvc.yaml is)")
    args = parser.parse_args()
    from action3d.errors import Action3dError

    try:
        cache(role=args.role, experiment=args.name, revision=args.revision, root=args.root)
    except Action3dError as err:
        sys.exit(f"action3d: error: {err}")
