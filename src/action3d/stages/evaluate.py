"""Stage evaluate: the paper's video-level test on a trained model.

Every non-overlapping T-frame window of every test video is scored; a video's class is the argmax of its clips'
mean softmax. With `evaluate.time_shuffle_control`, the same clips are scored again with their frames shuffled
in time: a model that uses motion drops to near chance there, one that reads single frames does not. The model's
training videos are scored too (`train_video_top1`): how well it fits the set it was trained on.

Writes into `out_dir`: metrics.json (DVC metrics), per_class.csv, predictions.csv (video, actual, predicted: DVC's
confusion plot), confusion.png; and the same to an MLflow run, a child of the training run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from action3d import engine
from action3d.config import Params
from action3d.plots import plot_confusion
from action3d.stages.common import pick_device, tracking_uri, training_run_id, write_csv, write_json


def score(params: Params, *, model_path: str | Path, manifest: str | Path, cache_dir: str | Path,
          control: bool = True) -> tuple[dict, dict]:
    """The video-level test of checkpoint `model_path` on `manifest` (classes.json beside it): (metrics, the
    engine's full result). The one measurement of a model: this stage writes it out, and the register stage
    re-scores a champion with it when the test split changed. `control=False` skips the time-shuffled control."""
    from action3d.data import make_eval_loader, read_classes
    from action3d.checkpoint import model_from_checkpoint

    manifest, model_path = Path(manifest), Path(model_path)
    classes = read_classes(manifest.parent / "classes.json")
    train = params.finetune  # the speed knobs of the model being evaluated
    device = pick_device(train.device)
    cfg = params.evaluate
    speed = dict(channels_last=train.channels_last, autocast_dtype=torch.bfloat16 if train.bf16 else None)
    model = engine.prepare_model(model_from_checkpoint(model_path), device, channels_last=train.channels_last)
    def loader(time_shuffle: bool):
        return make_eval_loader(manifest, cache_dir, clip_frames=params.clip.frames, crop_size=params.clip.crop_size,
                                stride=params.clip.stride, batch_size=cfg.batch_size, workers=cfg.workers,
                                time_shuffle=time_shuffle, seed=params.seed)

    criterion = nn.CrossEntropyLoss()
    result = engine.evaluate(model, criterion, loader(False), device, **speed)
    if result["video_probs"].shape[1] != len(classes):
        raise ValueError(f"{model_path} predicts {result['video_probs'].shape[1]} classes, {manifest} has "
                         f"{len(classes)}: evaluate the model fine-tuned on this set")
    metrics = {
        "video_top1": result["video_top1"], "video_top5": result["video_top5"], "clip_top1": result["top1"],
        "mean_class_accuracy": result["mean_class_accuracy"], "loss": result["loss"],
        "videos": result["videos"], "clips": result["clips"], "chance": 1.0 / len(classes),
    }
    if control and cfg.time_shuffle_control:
        shuffled = engine.evaluate(model, criterion, loader(True), device, **speed)
        metrics["time_shuffled_video_top1"] = shuffled["video_top1"]
    return metrics, result


def run(
    params: Params, *, model_path: str | Path, manifests_dir: str | Path, cache_dir: str | Path,
    out_dir: str | Path, subset: str = "test",
) -> dict:
    from action3d.data import read_classes, read_manifest

    manifests_dir, out_dir, model_path = Path(manifests_dir), Path(out_dir), Path(model_path)
    classes = read_classes(manifests_dir / "classes.json")
    manifest = manifests_dir / f"{subset}.csv"
    rows = read_manifest(manifest)
    metrics, result = score(params, model_path=model_path, manifest=manifest, cache_dir=cache_dir)
    train_csv = manifests_dir / "train.csv"
    if subset != "train" and train_csv.is_file():
        # how well the model fits its own training videos, scored the same way: a baseline that does not fit them
        # was not trained properly, and a gain over it says little
        fit, _ = score(params, model_path=model_path, manifest=train_csv, cache_dir=cache_dir, control=False)
        metrics["train_video_top1"] = fit["video_top1"]

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    matrix = result["confusion_matrix"]
    write_csv(out_dir / "per_class.csv", ["class", "accuracy", "videos"],
         [[name, f"{acc:.4f}", int(matrix[i].sum())] for i, (name, acc) in
          enumerate(zip(classes, result["per_class_accuracy"]))])
    predicted = result["video_probs"].argmax(axis=1)
    write_csv(out_dir / "predictions.csv", ["video", "actual", "predicted"],
         [[rows[int(v)]["path"], classes[int(a)], classes[int(p)]]
          for v, a, p in zip(result["video_index"], result["video_labels"], predicted)])
    plot_confusion(matrix, classes, out_dir / "confusion.png",
                   f"{model_path.parent.name}: video top-1 {metrics['video_top1']:.1%} on {result['videos']} videos")
    _track(params, out_dir, metrics, model_path, manifest)
    return metrics


def _track(params: Params, out_dir: Path, metrics: dict, model_path: Path, manifest: Path) -> None:
    from action3d.tracking import start_stage_run

    with start_stage_run(
        "evaluate", experiment=params.tracking.experiment, tracking_uri=tracking_uri(),
        params={"evaluate": params.evaluate.model_dump(), "clip": params.clip.model_dump()},
        params_hash=params.digest(), parent_run_id=training_run_id(model_path), tags={"model": str(model_path)},
    ) as run:  # fmt: skip
        run.log_manifest(manifest, context="test")
        run.log_metrics(metrics)
        for name in ("metrics.json", "per_class.csv", "predictions.csv", "confusion.png"):
            run.log_artifact(out_dir / name)
