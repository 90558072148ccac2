"""The training stages called as plain functions, as DVC, Prefect and Optuna call them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from action3d.errors import Action3dError
from action3d.stages import evaluate, finetune, pretrain, register

from .conftest import ROOT, TINY, write_tiny_params

pytestmark = pytest.mark.slow


def _finetune_data(root: Path) -> dict:
    return dict(manifests_dir=root / "data/splits/finetune", cache_dir=root / "data/cache/finetune")


def test_pretrain_finetune_evaluate_register(workdir, tiny_params):
    from mlflow import MlflowClient

    from action3d.stages.common import tracking_uri
    from action3d.tracking import load_registered_model

    pre = pretrain.run(tiny_params, manifests_dir=workdir / "data/splits/pretrain",
                       cache_dir=workdir / "data/cache/pretrain", out_dir=workdir / "runs/pretrain")
    assert pre["epochs"] == 2 and pre["epochs_resumed"] == 0
    for name in ("model.pt", "history.csv", "run.json"):
        assert (workdir / "runs/pretrain" / name).is_file(), name
    assert len((workdir / "runs/pretrain/history.csv").read_text().splitlines()) == 3  # header + 2 epochs

    ft = finetune.run(tiny_params, out_dir=workdir / "runs/finetune", pretrained=workdir / "runs/pretrain/model.pt",
                      **_finetune_data(workdir))
    assert ft["epochs"] == 2
    metrics = evaluate.run(tiny_params, model_path=workdir / "runs/finetune/model.pt", out_dir=workdir / "runs/eval",
                           **_finetune_data(workdir))
    assert 0.0 <= metrics["video_top1"] <= 1.0 and metrics["chance"] == pytest.approx(1 / 3)
    assert metrics["videos"] == len((workdir / "data/splits/finetune/test.csv").read_text().splitlines()) - 1
    assert "time_shuffled_video_top1" in metrics
    assert json.loads((workdir / "runs/eval/metrics.json").read_text()) == pytest.approx(metrics)
    assert (workdir / "runs/eval/confusion.png").stat().st_size > 1000
    predictions = (workdir / "runs/eval/predictions.csv").read_text().splitlines()
    assert predictions[0] == "video,actual,predicted" and len(predictions) == metrics["videos"] + 1

    # lineage: the fine-tuning run names the pretraining run as its parent, and records its data digests
    client = MlflowClient(tracking_uri())
    pre_run = json.loads((workdir / "runs/pretrain/run.json").read_text())["run_id"]
    ft_run = client.get_run(json.loads((workdir / "runs/finetune/run.json").read_text())["run_id"])
    assert ft_run.data.tags["parent_run_id"] == pre_run
    assert "data_digest.train" in ft_run.data.tags
    assert ft_run.data.params["finetune.lr"] == str(tiny_params.finetune.lr)
    assert [m.step for m in client.get_metric_history(ft_run.info.run_id, "train_loss")] == [1, 2]

    args = dict(train_dir=workdir / "runs/finetune", metrics_path=workdir / "runs/eval/metrics.json",
                test_manifest=workdir / "data/splits/finetune/test.csv", out_path=workdir / "runs/register.json")
    first = register.run(tiny_params, **args)
    assert first["alias"] == "champion" and first["created"]
    again = register.run(tiny_params, **args)  # the same run twice: no second version
    assert again["version"] == first["version"] and not again["created"]

    model = load_registered_model(tiny_params.registry.model_name, tracking_uri=tracking_uri())
    clips = torch.randn(3, 3, tiny_params.clip.frames, tiny_params.clip.crop_size, tiny_params.clip.crop_size)
    assert model(clips).shape == (3, 3)


def test_scratch_baseline_trains_every_layer_with_the_from_scratch_optimiser(workdir, tiny_params):
    from action3d.config import load_params
    from action3d.stages.finetune import build_model

    params = load_params(ROOT / "params.yaml", [*TINY, "finetune.init=scratch"])
    model, trainable = build_model(params, 5, pretrained=None)
    assert len(trainable) == len(list(model.parameters()))
    again, _ = build_model(params, 5, pretrained=None)  # seeded: a re-run starts from the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    result = finetune.run(params, out_dir=workdir / "runs/scratch", **_finetune_data(workdir))
    assert result["epochs"] == 2
    run = json.loads((workdir / "runs/scratch/run.json").read_text())
    from mlflow import MlflowClient

    logged = MlflowClient(run["tracking_uri"]).get_run(run["run_id"])
    assert logged.info.run_name == "scratch" and logged.data.tags["init"] == "scratch"
    assert float(logged.data.metrics["lr"]) == pytest.approx(params.pretrain.lr)  # the from-scratch optimiser


def test_finetune_without_a_pretrain_checkpoint_says_what_to_do(workdir, tiny_params):
    with pytest.raises(Action3dError, match=r"dvc repro pretrain.*finetune.init"):
        finetune.run(tiny_params, out_dir=workdir / "runs/finetune", pretrained=workdir / "nope.pt",
                     **_finetune_data(workdir))


def test_a_killed_training_stage_resumes_from_its_last_checkpoint(workdir):
    """Kill `action3d stage pretrain` after its first epoch's checkpoint; the re-run continues from it."""
    params = write_tiny_params(workdir)
    cmd = [sys.executable, "-m", "action3d.cli", "stage", "pretrain", "--params", str(params),
           "-S", "pretrain.epochs=3", "--manifests", "data/splits/pretrain", "--cache", "data/cache/pretrain",
           "--out", "runs/pretrain"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(workdir.glob("runs/pretrain/checkpoints/*/last.pt")):
        assert process.poll() is None, "the stage ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.2)
    process.kill()
    process.wait()
    assert not (workdir / "runs/pretrain/model.pt").exists()  # it died mid-run

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["epochs_resumed"] >= 1 and result["epochs"] == 3
    assert len((workdir / "runs/pretrain/history.csv").read_text().splitlines()) == 4
