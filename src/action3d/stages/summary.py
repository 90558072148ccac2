"""Stage summary: the pipeline's headline numbers in one small metrics file, for `dvc exp show` and `dvc metrics`.

The evaluate stages write full metrics per model; DVC names a metric by its file when two files share a key
(`runs/evaluate/finetune/metrics.json:video_top1`), which buries the knobs in `dvc exp show`. This file's keys are
unique and short: `finetune.video_top1`, `scratch.video_top1`, `transfer_gain`, ...
"""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params
from action3d.stages.common import read_json, write_json

KEYS = ("video_top1", "video_top5", "clip_top1", "train_video_top1", "time_shuffled_video_top1")


def run(params: Params, *, finetune_metrics: str | Path, scratch_metrics: str | Path, out_path: str | Path) -> dict:
    finetune = read_json(finetune_metrics, "evaluate@finetune")
    scratch = read_json(scratch_metrics, "evaluate@scratch")
    summary = {
        "finetune": {k: finetune[k] for k in KEYS if k in finetune},
        "scratch": {k: scratch[k] for k in KEYS if k in scratch and k != "time_shuffled_video_top1"},
        "transfer_gain": finetune["video_top1"] - scratch["video_top1"],  # the paper's RQ3, in points / 100
        "chance": finetune["chance"],
    }
    write_json(out_path, summary)
    return summary
