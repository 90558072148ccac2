"""Stage summary: the pipeline's headline numbers, each with a 95% interval, in one small metrics file.

The evaluate stages write full metrics per model; DVC names a metric by its file when two files share a key, which
buries the knobs in `dvc exp show`. This file's keys are unique and short (`finetune.video_top1`,
`scratch.video_top1`, `transfer_gain`, ...), and beside each accuracy is its bootstrap interval over the test
videos (`_low`, `_high`). The gain of fine-tuning over the baseline is paired: both models answer the same videos,
so its interval resamples videos for both at once, and McNemar's exact test gives its p-value.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from action3d.atomic import write_json
from action3d.config import Params
from action3d.metrics import bootstrap_interval, paired_difference
from action3d.stages import RunContext, read_output

KEYS = ("video_top1", "video_top5", "clip_top1", "train_video_top1")


def correct_by_video(folder: Path, column: str = "predicted") -> dict[str, bool]:
    """Per test video (its path), whether `column` of the evaluate stage's predictions.csv is its true class."""
    path = folder / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is written by the evaluate stage; run `dvc repro` first")
    with open(path, newline="") as f:
        return {row["video"]: row[column] == row["actual"] for row in csv.DictReader(f) if column in row}


def with_interval(correct: list[bool], seed: int) -> dict[str, float]:
    low, high = bootstrap_interval(np.array(correct), seed=seed)
    return {"low": low, "high": high}


def run(params: Params, *, finetune: str | Path, scratch: str | Path, out: str | Path,
        ctx: RunContext | None = None) -> dict:
    finetune, scratch = Path(finetune), Path(scratch)
    tuned, base = read_output(finetune / "metrics.json", "evaluate@finetune"), read_output(
        scratch / "metrics.json", "evaluate@scratch")
    right, wrong = correct_by_video(finetune), correct_by_video(scratch)
    if right.keys() != wrong.keys():
        raise ValueError(f"{finetune} and {scratch} scored different test videos: evaluate both on one test split")
    videos = sorted(right)
    summary: dict = {"chance": tuned["chance"], "test_videos": len(videos)}
    for name, metrics, hits in (("finetune", tuned, right), ("scratch", base, wrong)):
        interval = with_interval([hits[v] for v in videos], params.seed)
        summary[name] = {**{k: metrics[k] for k in KEYS if k in metrics},
                         "video_top1_low": interval["low"], "video_top1_high": interval["high"]}
    shuffled = correct_by_video(finetune, "predicted_time_shuffled")
    if shuffled:
        interval = with_interval([shuffled[v] for v in videos], params.seed)
        summary["finetune"].update(time_shuffled_video_top1=tuned["time_shuffled_video_top1"],
                                   time_shuffled_video_top1_low=interval["low"],
                                   time_shuffled_video_top1_high=interval["high"])
    gain = paired_difference(np.array([right[v] for v in videos]), np.array([wrong[v] for v in videos]),
                             seed=params.seed)  # the paper's RQ3: what pretraining is worth, in points / 100
    summary.update(transfer_gain=gain["difference"], transfer_gain_low=gain["low"], transfer_gain_high=gain["high"],
                   transfer_gain_p=gain["p_value"])
    write_json(out, summary)
    return summary
