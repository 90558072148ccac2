"""The report's findings (a) to (d) on known per-video answers: the summary stage's intervals and paired test, and
the words the report puts on them."""

import csv
import json
from pathlib import Path

import pytest

from action3d import report
from action3d.config import load_params
from action3d.stages import summary

CLASSES = 7  # chance 1/7, as in the demo
VIDEOS = [f"c{v % CLASSES}/v{v}.mp4" for v in range(140)]


def evaluated(folder: Path, right: list[bool], shuffled_right: int, train_fit: float) -> Path:
    """An evaluate stage's outputs for answers we choose: right[i] says whether video i was called correctly."""
    folder.mkdir(parents=True)
    with open(folder / "predictions.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["video", "actual", "predicted", "predicted_time_shuffled"])
        for i, (video, ok) in enumerate(zip(VIDEOS, right)):
            actual = video.split("/")[0]
            out.writerow([video, actual, actual if ok else "other", actual if i < shuffled_right else "other"])
    metrics = {"video_top1": sum(right) / len(right), "video_top5": 1.0, "clip_top1": sum(right) / len(right),
               "train_video_top1": train_fit, "chance": 1 / CLASSES, "time_shuffled_video_top1": shuffled_right / 140}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def history(path: Path, train_loss: float, val_loss: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"epoch,train_loss,val_loss\n1,2.0,2.0\n2,{train_loss},{val_loss}\n")


def findings(tmp_path: Path, finetuned: list[bool], baseline: list[bool], *, shuffled_right: int = 20,
             baseline_fit: float = 1.0, epochs: tuple[int, int] | None = None) -> tuple[dict, str]:
    runs = tmp_path / "runs"
    if epochs is not None:  # what each training stage's run.json says it ran: fine-tuning's, the baseline's
        for folder, n in zip((runs / "finetune", runs / "scratch" / "finetune"), epochs):
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps({"epochs": n}))
    ft = evaluated(runs / "evaluate" / "finetune", finetuned, shuffled_right, 0.99)
    sc = evaluated(runs / "evaluate" / "scratch", baseline, 0, baseline_fit)
    numbers = summary.run(load_params(None), finetune=ft, scratch=sc, out=runs / "metrics.json")
    return numbers, "\n".join(report.findings(runs))


def test_a_clear_gain_is_shown_with_its_paired_interval_and_p_value(tmp_path):
    finetuned = [True] * 130 + [False] * 10  # 92.9%
    baseline = [True] * 100 + [False] * 40  # 71.4%, wrong on every video the fine-tuned model misses
    numbers, text = findings(tmp_path, finetuned, baseline)
    assert numbers["test_videos"] == 140
    assert numbers["transfer_gain"] == pytest.approx(30 / 140)
    assert 0 < numbers["transfer_gain_low"] < 30 / 140 < numbers["transfer_gain_high"]
    assert numbers["transfer_gain_p"] == pytest.approx(2 * 0.5 ** 30)  # 30 disagreements, all one way
    low, high = numbers["finetune"]["video_top1_low"], numbers["finetune"]["video_top1_high"]
    assert 0.85 < low < 130 / 140 < high <= 1.0  # about 130/140 -/+ 2 standard errors (2.2 points)
    assert "(a) fine-tuned from pretraining   video top-1 92.9% [95% interval" in text
    assert "near chance: the model reads motion" in text  # 20/140 = 14.3% on shuffled frames
    assert "pretraining is worth +21.4 points" in text
    assert "the difference is shown (its interval excludes 0, McNemar p < 0.05)" in text
    assert "it fits them (100.0% >= 95.0%): a fair baseline" in text


def test_equal_models_that_disagree_are_said_not_to_differ(tmp_path):
    finetuned = [True, False] * 70  # both 50%, each right where the other is wrong
    baseline = [False, True] * 70
    numbers, text = findings(tmp_path, finetuned, baseline, shuffled_right=60, baseline_fit=0.6)
    assert numbers["transfer_gain"] == 0
    assert numbers["transfer_gain_low"] < 0 < numbers["transfer_gain_high"]
    assert numbers["transfer_gain_p"] == pytest.approx(1.0)
    assert "the difference is NOT shown: its interval holds 0" in text
    assert "it does NOT fit them (60.0% < 95.0%)" in text
    assert "well above chance: the model reads single frames too" in text  # 42.9% shuffled, chance 14.3%


def test_a_small_gain_the_paired_test_does_not_back_is_not_called_shown(tmp_path):
    finetuned = [True] * 120 + [False] * 20
    baseline = [True] * 114 + [False] * 6 + [True] * 3 + [False] * 17  # 6 videos one way, 3 the other: p = 0.51
    numbers, text = findings(tmp_path, finetuned, baseline)
    assert numbers["transfer_gain_p"] > 0.05
    assert "the difference is NOT" in text and "the difference is shown" not in text
    # where the two tests disagree (an interval that excludes 0, a p-value that does not), neither wins
    assert report.gain_verdict(0.01, 0.08, 0.06).startswith("the difference is NOT clearly shown")
    assert report.gain_verdict(-0.08, -0.01, 0.01).startswith("the difference is shown")  # a loss is shown too


def test_a_baseline_trained_fewer_epochs_than_fine_tuning_is_not_called_fair(tmp_path):
    finetuned = [True] * 130 + [False] * 10
    baseline = [True] * 100 + [False] * 40
    _, text = findings(tmp_path / "same", finetuned, baseline, epochs=(90, 90))
    assert "it fits them (100.0% >= 95.0%): a fair baseline" in text
    _, text = findings(tmp_path / "short", finetuned, baseline, epochs=(90, 60))
    assert "a fair baseline" not in text
    assert "trained 60 epochs against fine-tuning's 90: NOT the same budget" in text
    assert "scratch.finetune.epochs and finetune.epochs" in text  # the keys to change


def test_rq1_names_the_set_that_overfits(tmp_path):
    runs = tmp_path / "runs"
    history(runs / "scratch" / "pretrain" / "history.csv", 0.5, 0.55)
    history(runs / "scratch" / "finetune" / "history.csv", 0.1, 0.9)
    lines = report.overfitting_lines(runs)  # not evaluated yet: the small set's validation loss stands in
    assert "validation / train 1.1" in lines[0] and "validation / train 9.0" in lines[1]
    assert lines[2] == "  => trained from scratch, the network overfits the small set (9.0) far more than the large one (1.1)"
    history(runs / "scratch" / "finetune" / "history.csv", 0.5, 0.6)
    assert "not the paper's finding" in report.overfitting_lines(runs)[2]
    # evaluated: the small set's held-out loss is its test videos' (the paper's UCF-101 validation), not a few groups
    (runs / "evaluate" / "scratch").mkdir(parents=True)
    (runs / "evaluate" / "scratch" / "metrics.json").write_text('{"loss": 2.0, "video_top1": 0.7}')
    lines = report.overfitting_lines(runs)
    assert "test loss 2.000: test / train 4.0" in lines[1] and "far more than the large one (1.1)" in lines[2]
