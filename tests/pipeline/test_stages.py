"""The training stages called as plain functions, as DVC (through the CLI), Optuna and the tests all call them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from action3d.config import ParamsError, load_params
from action3d.project import file_md5, tracking_uri
from action3d.stages import STAGES, RunContext
from tests.helpers import ROOT, TINY

pytestmark = pytest.mark.slow


def scratch(params, root: Path, role: str = "pretrain", out: str | None = None, **kw) -> dict:
    return STAGES["scratch"].run(params, role=role, manifests=root / f"data/splits/{role}",
                                 cache=root / f"data/cache/{role}", out=root / (out or f"runs/scratch/{role}"), **kw)


def small_set(root: Path) -> dict:
    return dict(manifests=root / "data/splits/finetune", cache=root / "data/cache/finetune")


def run_of(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run_id"]


def test_pretrain_finetune_evaluate_summary_register(workdir, tiny_params):
    from mlflow import MlflowClient

    from action3d.tracking.registry import load_registered_model

    pre = scratch(tiny_params, workdir)
    assert pre["epochs"] == 2 and pre["epochs_resumed"] == 0
    for name in ("model.pt", "history.csv", "run.json", "curves.png"):
        assert (workdir / "runs/scratch/pretrain" / name).is_file(), name
    assert len((workdir / "runs/scratch/pretrain/history.csv").read_text().splitlines()) == 3  # header + 2 epochs
    with Image.open(workdir / "runs/scratch/pretrain/curves.png") as image:  # a DVC plot that renders offline
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300, image.size
        low, high = image.convert("L").getextrema()
    assert low < high, "a blank image"

    pretrained = workdir / "runs/scratch/pretrain/model.pt"
    ft = STAGES["finetune"].run(tiny_params, pretrained=pretrained, out=workdir / "runs/finetune", **small_set(workdir))
    assert ft["epochs"] == 2
    metrics = STAGES["evaluate"].run(tiny_params, model=workdir / "runs/finetune/model.pt",
                                     out=workdir / "runs/evaluate/finetune", **small_set(workdir))
    assert metrics["chance"] == pytest.approx(1 / 3)
    assert metrics["videos"] == len((workdir / "data/splits/finetune/test.csv").read_text().splitlines()) - 1
    assert json.loads((workdir / "runs/evaluate/finetune/metrics.json").read_text()) == pytest.approx(metrics)
    with open(workdir / "runs/evaluate/finetune/predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["videos"] and set(rows[0]) == {"video", "actual", "predicted", "predicted_time_shuffled"}
    assert metrics["video_top1"] == pytest.approx(sum(r["actual"] == r["predicted"] for r in rows) / len(rows))
    assert metrics["time_shuffled_video_top1"] == pytest.approx(
        sum(r["actual"] == r["predicted_time_shuffled"] for r in rows) / len(rows))  # the file is what the metric says

    # lineage: the fine-tuning run names the pretraining run as its source, and the digests of its inputs
    client = MlflowClient(tracking_uri())
    logged = [a.path for a in client.list_artifacts(run_of(workdir / "runs/scratch/pretrain"), "plots")]
    assert logged == ["plots/curves.png"]
    tags = client.get_run(run_of(workdir / "runs/finetune")).data.tags
    assert tags["source_run_id"] == run_of(workdir / "runs/scratch/pretrain") and tags["set"] == "finetune"
    assert tags["data_digest.pretrained"] == file_md5(pretrained)
    assert tags["data_digest.train"] == file_md5(workdir / "data/splits/finetune/train.csv")
    assert client.get_run(run_of(workdir / "runs/finetune")).data.params["finetune.lr"] == str(tiny_params.finetune.lr)
    evaluation = client.search_runs([client.get_run(run_of(workdir / "runs/finetune")).info.experiment_id],
                                    "tags.stage = 'evaluate'")[0]
    assert evaluation.data.tags["source_run_id"] == run_of(workdir / "runs/finetune")

    # the summary: the same videos for both models, paired
    scratch(tiny_params, workdir, role="finetune")
    STAGES["evaluate"].run(tiny_params, model=workdir / "runs/scratch/finetune/model.pt",
                           out=workdir / "runs/evaluate/scratch", **small_set(workdir))
    summary = STAGES["summary"].run(tiny_params, finetune=workdir / "runs/evaluate/finetune",
                                    scratch=workdir / "runs/evaluate/scratch", out=workdir / "runs/metrics.json")
    assert summary["test_videos"] == metrics["videos"]
    assert summary["finetune"]["video_top1"] == metrics["video_top1"]
    assert summary["finetune"]["video_top1_low"] <= metrics["video_top1"] <= summary["finetune"]["video_top1_high"]
    base = json.loads((workdir / "runs/evaluate/scratch/metrics.json").read_text())
    assert summary["transfer_gain"] == pytest.approx(metrics["video_top1"] - base["video_top1"])
    assert summary["transfer_gain_low"] <= summary["transfer_gain"] <= summary["transfer_gain_high"]

    args = dict(train=workdir / "runs/finetune", metrics=workdir / "runs/evaluate/finetune/metrics.json",
                out=workdir / "runs/register.json", **small_set(workdir))
    first = STAGES["register"].run(tiny_params, **args)
    assert first["alias"] == "champion" and first["created"]
    again = STAGES["register"].run(tiny_params, **args)  # the same run twice: no second version
    assert again["version"] == first["version"] and not again["created"]

    model = load_registered_model(tiny_params.registry.model_name, tracking_uri=tracking_uri())
    clips = torch.randn(3, 3, tiny_params.clip.frames, tiny_params.clip.crop_size, tiny_params.clip.crop_size)
    reference = torch.load(workdir / "runs/finetune/model.pt", map_location="cpu", weights_only=True)
    assert model(clips).shape == (3, 3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference["state_dict"].items())  # the same weights


def test_the_baseline_trains_every_layer_with_its_own_knobs(workdir):
    from mlflow import MlflowClient

    # its own section, the only one DVC re-runs it for: its lr and its epochs (null, which once meant finetune's, is
    # refused: DVC would not re-run the baseline when finetune.epochs changed)
    with pytest.raises(ParamsError, match=r"scratch\.finetune\.epochs.*set a number of epochs.*own section"):
        load_params(ROOT / "params.yaml", [*TINY, "scratch.finetune.epochs=null"])
    params = load_params(ROOT / "params.yaml", [*TINY, "scratch.finetune.lr=0.02", "scratch.finetune.epochs=3"])
    assert (params.scratch.finetune.epochs, params.finetune.epochs) == (3, 2)
    result = scratch(params, workdir, role="finetune")
    assert result["epochs"] == 3
    with open(workdir / "runs/scratch/finetune/history.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]  # the baseline's fit, reported
    assert (result["final_train_loss"], result["final_train_top1"]) == pytest.approx(
        (float(last["train_loss"]), float(last["train_top1"])))
    client = MlflowClient(tracking_uri())
    logged = client.get_run(run_of(workdir / "runs/scratch/finetune"))
    assert logged.info.run_name == "scratch@finetune" and logged.data.tags["init"] == "scratch"
    assert logged.data.params["scratch.finetune.lr"] == "0.02"
    first_lr = [m.value for m in client.get_metric_history(logged.info.run_id, "lr")][0]
    assert first_lr == pytest.approx(0.02)  # warmup's first epoch runs at the full lr with one warmup epoch

    again = scratch(params, workdir, role="finetune", out="runs/scratch-2")
    assert again["final_train_loss"] == result["final_train_loss"]  # seeded: same weights, same clips, same result


def test_model_pt_holds_the_kept_epoch_and_switching_keep_retrains_nothing(workdir):
    """keep: last (the reference's: model.pt = the last epoch's weights) or best (by validation video top-1). Which
    epoch is kept changes no weights, so switching it finishes at once from the run's checkpoints."""
    params = load_params(ROOT / "params.yaml", [*TINY, "scratch.pretrain.epochs=3"])
    out = workdir / "runs/scratch-keep"
    last = scratch(params, workdir, out="runs/scratch-keep")
    state = lambda name: torch.load(name, map_location="cpu", weights_only=False)  # noqa: E731
    checkpoints = next((out / "checkpoints").iterdir())
    assert last["kept_epoch"] == 3 and state(out / "model.pt")["epoch"] == 3
    assert all(torch.equal(v, state(checkpoints / "last.pt")["state_dict"][k])
               for k, v in state(out / "model.pt")["state_dict"].items())

    keep_best = load_params(ROOT / "params.yaml", [*TINY, "scratch.pretrain.epochs=3", "scratch.pretrain.keep=best"])
    best = scratch(keep_best, workdir, out="runs/scratch-keep")
    assert best["epochs_resumed"] == 3  # nothing retrained
    assert best["kept_epoch"] == best["best_epoch"] == state(out / "model.pt")["epoch"]
    assert best["model_val_video_top1"] == best["best_val_video_top1"]
    assert all(torch.equal(v, state(checkpoints / "best.pt")["state_dict"][k])
               for k, v in state(out / "model.pt")["state_dict"].items())


def test_split_logs_each_subsets_coverage_with_its_manifests_to_mlflow(workdir, tiny_params):
    from mlflow import MlflowClient

    out = workdir / "data/splits/again"
    metrics = STAGES["split"].run(tiny_params, role="finetune", out=out)
    assert metrics["coverage_train"] == metrics["coverage_test"] == 1.0
    client = MlflowClient(tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("action3d").experiment_id],
                                "tags.stage = 'split@finetune'")
    assert run.data.metrics["coverage_train"] == 1.0
    assert run.data.metrics["listed_train"] == run.data.metrics["found_train"] == metrics["train"]
    logged = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}  # context -> dataset
    assert set(logged) == {"train", "val", "test"}
    assert logged["train"].digest == file_md5(out / "train.csv")


def test_a_changed_cache_knob_trains_afresh_in_a_new_mlflow_run(workdir, tiny_params):
    """The resume key covers the frame cache: new frames are never trained on from an old checkpoint, and the new
    knobs go to a new MLflow run (MLflow refuses to change a run's params)."""
    first = scratch(tiny_params, workdir)
    first_run = run_of(workdir / "runs/scratch/pretrain")
    params = load_params(ROOT / "params.yaml", [*TINY, "cache.short_side=36"])
    STAGES["cache"].run(params, role="pretrain", videos=workdir / "data/splits/pretrain/slices/0.csv",
                        out=workdir / "data/cache/pretrain/slice-0")
    again = scratch(params, workdir)
    assert (first["epochs_resumed"], again["epochs_resumed"], again["epochs"]) == (0, 0, 2)
    assert run_of(workdir / "runs/scratch/pretrain") != first_run


def test_a_resumed_stage_in_another_tracking_store_starts_a_new_run(workdir, tiny_params, monkeypatch):
    from mlflow import MlflowClient

    scratch(tiny_params, workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'other.db'}")
    again = scratch(tiny_params, workdir)  # same knobs, same data: the finished checkpoint is reused
    assert again["epochs_resumed"] == 2
    run = MlflowClient(f"sqlite:///{workdir / 'other.db'}").get_run(run_of(workdir / "runs/scratch/pretrain"))
    assert run.info.status == "FINISHED"
    assert "resumed_from" not in run.data.tags  # the earlier run is in another store: nothing to link to


def test_a_resumed_stage_is_a_new_mlflow_run_linked_to_the_one_it_resumes(workdir, tiny_params):
    """Each start of a stage is its own MLflow run, so that a run's duration is the time it spent."""
    from mlflow import MlflowClient

    scratch(tiny_params, workdir)
    first = run_of(workdir / "runs/scratch/pretrain")
    again = scratch(tiny_params, workdir)  # same knobs, same data, same store: the checkpoint is complete
    second = run_of(workdir / "runs/scratch/pretrain")
    assert second != first and again["epochs_resumed"] == again["epochs"] == 2
    client = MlflowClient(tracking_uri())
    run = client.get_run(second)
    assert run.data.tags["resumed_from"] == first and run.data.tags["epochs_resumed"] == "2"
    assert run.data.metrics["epochs_resumed"] == 2 and run.info.status == "FINISHED"
    assert "resumed_from" not in client.get_run(first).data.tags
    assert client.get_run(first).info.status == "FINISHED"  # untouched: not reopened


def test_a_run_context_tags_and_nests_the_run_and_sees_every_epoch(workdir, tiny_params):
    from mlflow import MlflowClient

    from action3d.tracking.runs import create_parent_run

    parent = create_parent_run("tune-x", experiment="action3d", tracking_uri=tracking_uri())
    seen = []
    ctx = RunContext(tags={"study": "x", "trial": "4"}, parent_run_id=parent.run_id,
                     on_epoch=lambda epoch, metrics: seen.append((epoch, metrics["train_loss"])))
    scratch(tiny_params, workdir, ctx=ctx)
    tags = MlflowClient(tracking_uri()).get_run(ctx.run_id).data.tags
    assert (tags["study"], tags["trial"], tags["mlflow.parentRunId"]) == ("x", "4", parent.run_id)
    assert [epoch for epoch, _ in seen] == [1, 2] and [row["epoch"] for row in ctx.history] == [1, 2]
    assert [loss for _, loss in seen] == [row["train_loss"] for row in ctx.history]


@pytest.mark.parametrize("why", ["wrong", "slower"])
def test_bf16_asked_for_where_it_loses_trains_in_fp32_and_says_so(workdir, tiny_params, capsys, monkeypatch, why):
    """scratch.pretrain.bf16: true on a device whose bf16 kernels are wrong (or not faster): the stage measures each
    convolution, keeps every one in fp32, says so and tags its run, and trains exactly as fp32 does. The device's
    kernels are replaced with an injected wrong (or slow) one, so that both paths run on any machine."""
    from mlflow import MlflowClient

    from action3d import precision

    real = precision.conv_forward_backward

    def wrong(x, w, g, sig):
        y, gx, gw = real(x, w, g, sig)
        return (y, gx, torch.full_like(gw, float("inf"))) if x.dtype == torch.bfloat16 else (y, gx, gw)

    def slower(sig, dtype, **_):
        return 2.0 if dtype == torch.bfloat16 else 1.0

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # as on an AVX512-BF16 CPU or a GPU
    monkeypatch.setattr(precision, "conv_forward_backward", wrong if why == "wrong" else real)
    monkeypatch.setattr(precision, "time_layer", slower if why == "slower" else precision.time_layer)
    fp32 = scratch(tiny_params, workdir, out="runs/fp32")
    asked = load_params(ROOT / "params.yaml", [*TINY, "scratch.pretrain.bf16=true"])
    bf16 = scratch(asked, workdir, out="runs/bf16")
    said = capsys.readouterr().out
    reason = "wrong in bf16" if why == "wrong" else "not faster in bf16 (0.50x)"
    assert "[scratch@pretrain] precision: fp32 for every layer" in said and reason in said
    tag = MlflowClient(tracking_uri()).get_run(run_of(workdir / "runs/bf16")).data.tags["precision"]
    assert tag.startswith("fp32 for every layer") and reason in tag
    assert bf16["final_train_loss"] == fp32["final_train_loss"]  # no autocast at all: fp32's very numbers
