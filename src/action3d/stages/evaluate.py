"""Stage evaluate: the paper's video-level test on a trained model.

Every non-overlapping T-frame window of every test video is scored; a video's class is the argmax of its clips'
mean softmax. With `evaluate.time_shuffle_control`, the same clips are scored again with their frames shuffled
in time: a model that uses motion drops to near chance there, one that reads single frames does not. The model's
training videos are scored too (`train_video_top1`): how well it fits the set it was trained on.

Writes into `out`: metrics.json (DVC metrics), per_class.csv, predictions.csv (per video: actual, predicted, and
predicted with frames shuffled: the summary's intervals and paired test read it), confusion.png; and the same to an
MLflow run linked to the model's training run.
"""

from __future__ import annotations

from pathlib import Path

from action3d.atomic import write_csv, write_json
from action3d.config import Params
from action3d.stages import RunContext, source_run


def score(params: Params, *, model: str | Path, manifest: str | Path, cache: str | Path,
          control: bool = True) -> tuple[dict, dict]:
    """The video-level test of checkpoint `model` on `manifest` (classes.json beside it): (metrics, the engine's
    full result, with `shuffled` the control's when run). The one measurement of a model: this stage writes it out,
    and the register stage re-scores a champion with it when the test split changed."""
    import torch
    from torch import nn

    from action3d import engine
    from action3d.models.transfer import model_from_checkpoint
    from action3d.data import make_eval_loader, read_classes
    from action3d.distributed import pick_device

    manifest, knobs = Path(manifest), params.evaluate
    classes = read_classes(manifest.parent / "classes.json")
    device = pick_device(knobs.device)
    net = engine.prepare_model(model_from_checkpoint(model), device, channels_last=knobs.channels_last)

    def loader(time_shuffle: bool):
        return make_eval_loader(manifest, cache, clip_frames=params.clip.frames, crop_size=params.clip.crop_size,
                                stride=params.clip.stride, batch_size=knobs.batch_size, workers=knobs.workers,
                                time_shuffle=time_shuffle, seed=params.seed)

    criterion = nn.CrossEntropyLoss()
    with torch.inference_mode():
        result = engine.evaluate(net, criterion, loader(False), device, channels_last=knobs.channels_last)
    if result["video_probs"].shape[1] != len(classes):
        raise ValueError(f"{model} predicts {result['video_probs'].shape[1]} classes, {manifest} has {len(classes)}: "
                         "evaluate the model trained on this set")
    metrics = {
        "video_top1": result["video_top1"], "video_top5": result["video_top5"], "clip_top1": result["top1"],
        "mean_class_accuracy": result["mean_class_accuracy"], "loss": result["loss"],
        "videos": result["videos"], "clips": result["clips"], "chance": 1.0 / len(classes),
    }
    if control and knobs.time_shuffle_control:
        result["shuffled"] = engine.evaluate(net, criterion, loader(True), device, channels_last=knobs.channels_last)
        metrics["time_shuffled_video_top1"] = result["shuffled"]["video_top1"]
    return metrics, result


def run(params: Params, *, model: str | Path, manifests: str | Path, cache: str | Path, out: str | Path,
        ctx: RunContext | None = None) -> dict:
    from action3d.data import read_classes, read_manifest
    from action3d.plots import plot_confusion

    manifests, out, model = Path(manifests), Path(out), Path(model)
    classes = read_classes(manifests / "classes.json")
    test = manifests / "test.csv"
    metrics, result = score(params, model=model, manifest=test, cache=cache)
    # how well the model fits its own training videos, scored the same way: a baseline that does not fit them was
    # not trained properly, and a gain over it says little
    metrics["train_video_top1"] = score(params, model=model, manifest=manifests / "train.csv", cache=cache,
                                        control=False)[0]["video_top1"]

    rows = read_manifest(test)
    matrix = result["confusion_matrix"]
    columns = [result["video_index"], result["video_labels"], result["video_probs"].argmax(axis=1)]
    header = ["video", "actual", "predicted"]
    if "shuffled" in result:  # the same videos in the same order (both sorted by manifest row)
        columns.append(result["shuffled"]["video_probs"].argmax(axis=1))
        header.append("predicted_time_shuffled")
    write_json(out / "metrics.json", metrics)
    write_csv(out / "per_class.csv", ["class", "accuracy", "videos"],
              [[name, f"{acc:.4f}", int(matrix[i].sum())] for i, (name, acc) in
               enumerate(zip(classes, result["per_class_accuracy"]))])
    write_csv(out / "predictions.csv", header,
              [[rows[int(v)]["path"], *(classes[int(c)] for c in rest)] for v, *rest in zip(*columns)])
    plot_confusion(matrix, classes, out / "confusion.png",
                   f"{model.parent.name}: video top-1 {metrics['video_top1']:.1%} on {result['videos']} videos")
    _track(params, out, metrics, model, test, ctx or RunContext())
    return metrics


def _track(params: Params, out: Path, metrics: dict, model: Path, manifest: Path, ctx: RunContext) -> None:
    from action3d.project import tracking_uri
    from action3d.tracking.runs import start_stage_run

    with start_stage_run(
        "evaluate", experiment=params.tracking.experiment, tracking_uri=tracking_uri(),
        params={**{f"evaluate.{k}": v for k, v in params.evaluate.model_dump().items()},
                **{f"clip.{k}": v for k, v in params.clip.model_dump().items()}},
        params_hash=params.digest(), source_run_id=source_run(model), parent_run_id=ctx.parent_run_id,
        tags={"model": str(model), **ctx.tags},
    ) as run:  # fmt: skip
        ctx.run_id = run.run_id
        run.log_manifest(manifest, context="test")
        run.log_metrics(metrics)
        for name in ("metrics.json", "per_class.csv", "predictions.csv", "confusion.png"):
            run.log_artifact(out / name)
