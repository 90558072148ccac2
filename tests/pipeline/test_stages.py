"""The training stages called as plain functions, as DVC, Prefect and Optuna call them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from action3d.errors import Action3dError
from action3d.stages import evaluate, finetune, pretrain, register

from .conftest import ROOT, TINY

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
    assert metrics["chance"] == pytest.approx(1 / 3)
    assert metrics["videos"] == len((workdir / "data/splits/finetune/test.csv").read_text().splitlines()) - 1
    assert "time_shuffled_video_top1" in metrics
    assert json.loads((workdir / "runs/eval/metrics.json").read_text()) == pytest.approx(metrics)
    assert (workdir / "runs/eval/confusion.png").stat().st_size > 1000
    predictions = (workdir / "runs/eval/predictions.csv").read_text().splitlines()
    assert predictions[0] == "video,actual,predicted" and len(predictions) == metrics["videos"] + 1
    hits = [row.split(",")[1] == row.split(",")[2] for row in predictions[1:]]
    assert metrics["video_top1"] == pytest.approx(sum(hits) / len(hits))  # the metric is what the rows say

    # lineage: the fine-tuning run names the pretraining run as its parent, and records its data digests
    client = MlflowClient(tracking_uri())
    pre_run = json.loads((workdir / "runs/pretrain/run.json").read_text())["run_id"]
    ft_run = client.get_run(json.loads((workdir / "runs/finetune/run.json").read_text())["run_id"])
    assert ft_run.data.tags["parent_run_id"] == pre_run
    assert "data_digest.train" in ft_run.data.tags
    assert ft_run.data.params["finetune.lr"] == str(tiny_params.finetune.lr)
    assert [m.step for m in client.get_metric_history(ft_run.info.run_id, "train_loss")] == [1, 2]

    args = dict(train_dir=workdir / "runs/finetune", metrics_path=workdir / "runs/eval/metrics.json",
                test_manifest=workdir / "data/splits/finetune/test.csv", cache_dir=workdir / "data/cache/finetune",
                out_path=workdir / "runs/register.json")
    first = register.run(tiny_params, **args)
    assert first["alias"] == "champion" and first["created"]
    again = register.run(tiny_params, **args)  # the same run twice: no second version
    assert again["version"] == first["version"] and not again["created"]

    model = load_registered_model(tiny_params.registry.model_name, tracking_uri=tracking_uri())
    clips = torch.randn(3, 3, tiny_params.clip.frames, tiny_params.clip.crop_size, tiny_params.clip.crop_size)
    assert model(clips).shape == (3, 3)


def test_scratch_baseline_trains_every_layer_with_its_own_knobs(workdir):
    from mlflow import MlflowClient

    from action3d.config import load_params
    from action3d.stages import scratch
    from action3d.stages.common import tracking_uri

    # its own section: its lr, and finetune's epoch count unless it sets its own
    params = load_params(ROOT / "params.yaml", [*TINY, "scratch.lr=0.02", "scratch.epochs=null", "scratch.workers=0",
                                                "scratch.batch_size=4", "finetune.epochs=3"])
    assert params.scratch.epochs == 3
    result = scratch.run(params, out_dir=workdir / "runs/scratch", **_finetune_data(workdir))
    assert result["epochs"] == 3
    import csv

    last = list(csv.DictReader(open(workdir / "runs/scratch/history.csv")))[-1]  # the baseline's fit, reported
    assert (result["final_train_loss"], result["final_train_top1"]) == pytest.approx(
        (float(last["train_loss"]), float(last["train_top1"])))
    run = json.loads((workdir / "runs/scratch/run.json").read_text())
    logged = MlflowClient(tracking_uri()).get_run(run["run_id"])
    assert logged.info.run_name == "scratch" and logged.data.tags["init"] == "scratch"
    assert logged.data.params["scratch.lr"] == "0.02"
    first_lr = [m.value for m in MlflowClient(tracking_uri()).get_metric_history(run["run_id"], "lr")][0]
    assert first_lr == pytest.approx(0.02)  # warmup's first epoch runs at the full lr with one warmup epoch

    again = scratch.run(params, out_dir=workdir / "runs/scratch-2", **_finetune_data(workdir))
    assert again["final_train_loss"] == result["final_train_loss"]  # seeded: same weights, same clips, same result


def test_finetune_without_a_pretrain_checkpoint_says_what_to_do(workdir, tiny_params):
    with pytest.raises(Action3dError, match=r"dvc repro pretrain.*finetune.init"):
        finetune.run(tiny_params, out_dir=workdir / "runs/finetune", pretrained=workdir / "nope.pt",
                     **_finetune_data(workdir))


def _pretrain(params, root: Path, out: str = "runs/pretrain") -> dict:
    return pretrain.run(params, manifests_dir=root / "data/splits/pretrain", cache_dir=root / "data/cache/pretrain",
                        out_dir=root / out)


def test_a_changed_cache_knob_trains_afresh_in_a_new_mlflow_run(workdir, tiny_params):
    """The resume key covers the frame cache: new frames are never trained on from an old checkpoint, and the new
    knobs go to a new MLflow run (MLflow refuses to change a run's params)."""
    from action3d.config import load_params
    from action3d.stages import cache

    first = _pretrain(tiny_params, workdir)
    first_run = json.loads((workdir / "runs/pretrain/run.json").read_text())["run_id"]
    params = load_params(ROOT / "params.yaml", [*TINY, "cache.short_side=36"])
    cache.run(params, manifests_dir=workdir / "data/splits/pretrain", data_root=workdir / "data/raw/pretrain",
              out_dir=workdir / "data/cache/pretrain", workers=1)
    again = _pretrain(params, workdir)
    assert (first["epochs_resumed"], again["epochs_resumed"], again["epochs"]) == (0, 0, 2)
    second_run = json.loads((workdir / "runs/pretrain/run.json").read_text())["run_id"]
    assert second_run != first_run


def test_a_resumed_stage_in_another_tracking_store_starts_a_new_run(workdir, tiny_params, monkeypatch):
    _pretrain(tiny_params, workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'other.db'}")
    again = _pretrain(tiny_params, workdir)  # same knobs, same data: the finished checkpoint is reused
    assert again["epochs_resumed"] == 2
    from mlflow import MlflowClient

    run_id = json.loads((workdir / "runs/pretrain/run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{workdir / 'other.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "resumed_from" not in run.data.tags  # the earlier run is in another store: nothing to link to


def test_a_resumed_stage_is_a_new_mlflow_run_linked_to_the_one_it_resumes(workdir, tiny_params):
    """Each start of a stage is its own MLflow run, so that a run's duration is the time it spent (reopening the
    first run made a resumption that trained nothing last as long as the time between the two)."""
    from mlflow import MlflowClient

    from action3d.stages.common import tracking_uri

    _pretrain(tiny_params, workdir)
    first = json.loads((workdir / "runs/pretrain/run.json").read_text())["run_id"]
    again = _pretrain(tiny_params, workdir)  # same knobs, same data, same store: the checkpoint is complete
    second = json.loads((workdir / "runs/pretrain/run.json").read_text())["run_id"]
    assert second != first and again["epochs_resumed"] == again["epochs"] == 2
    client = MlflowClient(tracking_uri())
    run = client.get_run(second)
    assert run.data.tags["resumed_from"] == first and run.data.tags["epochs_resumed"] == "2"
    assert run.data.metrics["epochs_resumed"] == 2 and run.info.status == "FINISHED"
    assert "resumed_from" not in client.get_run(first).data.tags
    assert client.get_run(first).info.status == "FINISHED"  # untouched: not reopened
    assert run.info.end_time - run.info.start_time < 60_000  # it trained nothing: its duration says so


def test_bf16_on_a_cpu_whose_bf16_convolutions_are_wrong_trains_in_fp32(workdir, capsys):
    """pretrain.bf16: true on the CPU: the stage checks its model's convolutions first and trains in fp32, saying
    why, exactly when the check finds a layer whose bf16 result strays (the MLflow run's `bf16` tag says which)."""
    from mlflow import MlflowClient

    from action3d import engine
    from action3d.config import load_params
    from action3d.models import create_model
    from action3d.stages.common import tracking_uri

    params = load_params(ROOT / "params.yaml", [*TINY, "pretrain.bf16=true"])
    clip = (3, params.clip.frames, params.clip.crop_size, params.clip.crop_size)
    expected_wrong = engine.bf16_convolution_errors(create_model(params.model.name, n_classes=3,
                                                                 **params.model.kwargs), clip)
    _pretrain(params, workdir)
    said = capsys.readouterr().out
    run_id = json.loads((workdir / "runs/pretrain/run.json").read_text())["run_id"]
    tag = MlflowClient(tracking_uri()).get_run(run_id).data.tags["bf16"]
    if expected_wrong:  # this development CPU (AVX512-BF16, torch 2.14): layer2.0.conv2's weight gradient
        assert "bf16 off, training in fp32" in said and next(iter(expected_wrong)) in said and tag == "False"
    else:
        assert "bf16 off" not in said and tag == "True"
