"""One training stage on N machines at once: torchrun's c10d rendezvous, the nodes started by Prefect on a pool.

    python flows/train.py --stage scratch@pretrain --nnodes 2 --rdzv-endpoint HOST:PORT

HOST:PORT is a free port on a machine every node reaches (torchrun's rendezvous store; params.yaml's
`distributed.rdzv_endpoint` when not given). This flow:

1. here: `dvc repro --pull` of what the stage needs (its upstream stages), saved as the DVC experiment
   `<name>-inputs` and pushed (its git ref to origin, its outputs to the DVC remote); a stage dvc.lock already
   holds for these inputs and knobs starts no node;
2. on the pool, one flow run per node (deployment `train-node`, `train_node` below), all at once: each checks out
   that experiment and sets the stage's `nnodes`. Node 0 owns the stage: it runs it inside `dvc repro` (DVC records
   its outputs), its first process writes the checkpoints (and their S3 mirror) and the one MLflow run, and it
   pushes the result as the DVC experiment `<name>`. Nodes 1..N-1 pull the stage's inputs and run its command as
   participants. torchrun restarts every rank from the last checkpoint when one fails (`distributed.max_restarts`);
3. a node run that ends without success fails the flow; cancelling the flow cancels every node run, whose stage
   processes stop their ranks.

Every node runs the same code, data and knobs; the global batch is `batch_size` x `nproc` x `nnodes` (see
params.yaml). `dvc exp pull origin <name>` brings the result back.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the clone's code (see flows/pipeline.py)

from prefect import flow  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.runtime import deployment  # noqa: E402

from action3d.config import load_params  # noqa: E402
from action3d.distributed import OWNER_ENV  # noqa: E402
from action3d.stages import STAGES  # noqa: E402
from action3d.workspace import Workspace, WorkspaceError  # noqa: E402

NODE_DEPLOYMENT = "action3d-train-node/train-node"


def section_of(stage: str) -> str:
    """The params section of a training stage: `finetune`, or `scratch.<role>` for scratch@<role>."""
    name, _, role = stage.partition("@")
    if name not in STAGES or not STAGES[name].trains:
        raise WorkspaceError(f"{stage!r} is not a training stage; these are: finetune, scratch@pretrain, "
                             "scratch@finetune")
    return "finetune" if name == "finetune" else f"scratch.{role}"


@flow(name="action3d-train-node", log_prints=True)
def train_node(stage: str, node: int, nnodes: int, rdzv_endpoint: str, job_id: str, revision: str,
               experiment: str, overrides: list[str] | None = None, root: str = ".") -> dict:
    """One node of a multi-node stage: node 0 runs it inside DVC and pushes the experiment; the others join."""
    ws = Workspace(root)
    if node == 0 and deployment.id:
        print(f"tracking into {ws.check_tracking_store()}")
    print(f"checked out {revision} = {ws.checkout(revision)}")
    ws.set_params([*(overrides or []), f"{section_of(stage)}.nnodes={nnodes}"])
    env = {"ACTION3D_RDZV_ENDPOINT": rdzv_endpoint, "ACTION3D_RDZV_ID": job_id}
    command, inputs = ws.stage_command(stage)
    ws.run("dvc", "pull", "--quiet", *inputs)  # the stage's inputs, the same on every node
    if node == 0:
        # forced, never restored from DVC's run cache: the other nodes are waiting at the rendezvous for this one
        ran = ws.repro(stage, single=True, force=True, env={**env, OWNER_ENV: "1"})
        ws.save_experiment(experiment, [stage])
        ws.push_experiment(experiment)
        print(f"node 0 of {nnodes}: {stage} {'ran' if ran else 'was up to date'}; DVC experiment {experiment} pushed")
        return {"node": node, "ran": bool(ran), "experiment": experiment}
    ws.run("bash", "-c", command, echo=True, env=env)
    print(f"node {node} of {nnodes}: took part in {stage}")
    return {"node": node, "ran": True}


@flow(name="action3d-train", log_prints=True)
def train(stage: str = "scratch@pretrain", nnodes: int = 2, rdzv_endpoint: str | None = None,
          experiment: str | None = None, overrides: list[str] | None = None, revision: str | None = None,
          root: str = ".", deployment_name: str = NODE_DEPLOYMENT) -> dict:
    """Train `stage` on `nnodes` workers of the pool at once (one node run each), as one DVC stage run."""
    ws = Workspace(root)
    if commit := ws.ready_for_pool(revision):
        print(f"checked out {revision} = {commit}")
    # nnodes is one of the stage's knobs (the global batch): set here too, so that dvc.lock is asked about this run
    overrides = [*(overrides or []), f"{section_of(stage)}.nnodes={nnodes}"]
    params = load_params(ws.root / "params.yaml", overrides)
    endpoint = rdzv_endpoint or params.distributed.rdzv_endpoint
    if not endpoint:
        raise WorkspaceError("the nodes need a place to meet: pass --rdzv-endpoint HOST:PORT (a free port on a "
                             "machine every node reaches) or set distributed.rdzv_endpoint in params.yaml")
    name = experiment or f"train-{stage.replace('@', '-')}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    ws.set_params(overrides)

    upstream = [s for s in ws.stages([stage]) if s != stage]
    for before in upstream:  # what the stage reads, here or from the remote's run cache
        ws.repro(before, pull=True, single=True)
    if ws.is_current(stage):  # no node to start: they would wait for one that has nothing to train
        print(f"{stage} is up to date in dvc.lock: `dvc pull {stage}` gets its outputs; change a knob to train again")
        return {"experiment": None, "nodes": []}
    ws.save_experiment(f"{name}-inputs", upstream)
    ws.push_experiment(f"{name}-inputs")
    base = ws.experiment_ref(f"{name}-inputs")

    job = f"{name}-{stage.replace('@', '-')}"
    with ThreadPoolExecutor(nnodes) as pool:  # every node at once: the rendezvous waits for all of them
        futures = [pool.submit(run_deployment, deployment_name, as_subflow=False, timeout=None, poll_interval=2,
                               flow_run_name=f"{job}-node{node}",
                               parameters={"stage": stage, "node": node, "nnodes": nnodes, "rdzv_endpoint": endpoint,
                                           "job_id": job, "revision": base, "experiment": name,
                                           "overrides": overrides})
                   for node in range(nnodes)]
        runs = [f.result() for f in futures]
    failed = [r.name for r in runs if not r.state.is_completed()]
    if failed:
        raise WorkspaceError(f"{stage} on {nnodes} nodes: {', '.join(failed)} did not complete; their logs in Prefect "
                             "say why. Run this flow again: the stage resumes from its last checkpoint")
    print(f"{stage} trained on {nnodes} nodes ({', '.join(r.name for r in runs)}); DVC experiment {name} pushed: "
          f"`dvc exp pull origin {name}`")
    return {"experiment": name, "nodes": [r.name for r in runs]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="scratch@pretrain", help="a training stage of dvc.yaml")
    parser.add_argument("--nnodes", type=int, default=2, help="machines (workers of the pool) to train on")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT every node reaches (torchrun's c10d)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a knob")
    parser.add_argument("--name", default=None, help="the DVC experiment's name")
    parser.add_argument("--revision", default=None, help="git branch, tag or commit to check out first")
    parser.add_argument("--root", default=".", help="the project folder (where dvc.yaml is)")
    args = parser.parse_args()
    from action3d.errors import Action3dError

    try:
        train(stage=args.stage, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, experiment=args.name,
              overrides=args.set, revision=args.revision, root=args.root)
    except Action3dError as err:
        sys.exit(f"action3d: error: {err}")
