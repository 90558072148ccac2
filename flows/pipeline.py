"""The pipeline as a Prefect flow: the same stage functions as `dvc repro`, as tasks, for schedules and workers.

    python flows/pipeline.py                          # one run now, on Prefect's ephemeral local API
    python flows/pipeline.py -S finetune.lr=0.01      # with overrides, as `dvc exp run -S`

On a Prefect server with a work pool, deploy it (`prefect deploy flows/pipeline.py:pipeline`) with a schedule, and
GPU workers run it. A training task that fails is retried, and resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task

from action3d.config import load_params
from action3d.stages import cache, evaluate, finetune, pretrain, register, scratch, split, synth

RETRY = dict(retries=2, retry_delay_seconds=30)  # training resumes from runs/<stage>/checkpoints on a retry


@task(name="data")
def data_task(params, root: Path) -> None:
    synth.run(params, out_dir=root / "data/raw")
    for role in ("pretrain", "finetune"):
        split.run(params, role=role, data_root=root / f"data/raw/{role}", out_dir=root / f"data/splits/{role}")
        cache.run(params, manifests_dir=root / f"data/splits/{role}", data_root=root / f"data/raw/{role}",
                  out_dir=root / f"data/cache/{role}")


@task(name="pretrain", **RETRY)
def pretrain_task(params, root: Path) -> dict:
    return pretrain.run(params, manifests_dir=root / "data/splits/pretrain", cache_dir=root / "data/cache/pretrain",
                        out_dir=root / "runs/pretrain")


@task(name="finetune", **RETRY)
def finetune_task(params, root: Path) -> dict:
    return finetune.run(params, manifests_dir=root / "data/splits/finetune", cache_dir=root / "data/cache/finetune",
                        out_dir=root / "runs/finetune", pretrained=root / "runs/pretrain/model.pt")


@task(name="scratch", **RETRY)
def scratch_task(params, root: Path) -> dict:
    return scratch.run(params, manifests_dir=root / "data/splits/finetune", cache_dir=root / "data/cache/finetune",
                       out_dir=root / "runs/scratch")


@task(name="evaluate")
def evaluate_task(params, root: Path, which: str) -> dict:
    return evaluate.run(params, model_path=root / f"runs/{which}/model.pt", manifests_dir=root / "data/splits/finetune",
                        cache_dir=root / "data/cache/finetune", out_dir=root / f"runs/evaluate/{which}")


@task(name="register")
def register_task(params, root: Path) -> dict:
    return register.run(params, train_dir=root / "runs/finetune", metrics_path=root / "runs/evaluate/finetune/metrics.json",
                        test_manifest=root / "data/splits/finetune/test.csv", cache_dir=root / "data/cache/finetune",
                        out_path=root / "runs/register/registration.json")


@flow(name="action3d-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".",
             baseline: bool = True) -> dict:
    """synth -> split -> cache -> pretrain -> finetune (+ the scratch baseline) -> evaluate -> register."""
    root_dir = Path(root).resolve()
    params = load_params(root_dir / params_path, overrides or [])
    data_task(params, root_dir)
    pretrain_task(params, root_dir)
    finetune_task(params, root_dir)
    results = {"finetune": evaluate_task(params, root_dir, "finetune")}
    if baseline:
        scratch_task(params, root_dir)
        results["scratch"] = evaluate_task(params, root_dir, "scratch")
    results["registration"] = register_task(params, root_dir)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    pipeline(args.params, args.set)
