"""The PNG charts `dvc plots show` embeds (they render offline, unlike its Vega charts)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from action3d.plots import plot_confusion, plot_history, spans_decades


def _history(losses, lrs=None):
    return [{"epoch": i + 1, "lr": (lrs or [0.01] * len(losses))[i], "train_loss": loss, "val_loss": loss * 1.2,
             "train_top1": min(1.0, 0.2 * (i + 1)), "val_top1": 0.1 * (i + 1), "val_video_top1": 0.15 * (i + 1),
             "train_clips_per_s": 100.0}
            for i, loss in enumerate(losses)]


def assert_non_blank_png(path, min_size=(300, 200)):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        extrema = image.convert("L").getextrema()
    assert extrema[0] < extrema[1], "a single colour"


def test_loss_spanning_decades_is_drawn_on_a_log_axis(tmp_path):
    path = tmp_path / "curves.png"
    fig = plot_history(_history([40.0, 1.5, 0.9, 0.3], lrs=[0.1, 0.01, 0.001, 0.0001]), path, title="pretrain")
    loss_ax, acc_ax, lr_ax = fig.axes
    assert loss_ax.get_yscale() == "log"
    assert loss_ax.get_xlabel() == "epoch" and "loss" in loss_ax.get_ylabel()
    assert {line.get_label() for line in loss_ax.get_lines()} == {"train loss", "val loss (clips)"}
    assert acc_ax.get_yscale() == "linear" and acc_ax.get_ylim() == (0.0, 1.0)
    assert {line.get_label() for line in acc_ax.get_lines()} == {
        "train top-1 (clips)", "val top-1 (clips)", "val top-1 (videos)"}
    assert lr_ax.get_yscale() == "log"
    assert "pretrain" in fig.get_suptitle()
    assert_non_blank_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left


def test_loss_within_a_decade_stays_linear(tmp_path):
    fig = plot_history(_history([1.1, 0.9, 0.7], lrs=[0.01, 0.01, 0.01]), tmp_path / "c.png")
    assert fig.axes[0].get_yscale() == "linear"
    assert fig.axes[2].get_yscale() == "linear"
    assert spans_decades([10, 1]) and not spans_decades([9, 1]) and not spans_decades([5])


def test_history_without_validation_or_lr_still_draws(tmp_path):
    rows = [{"epoch": 1, "train_loss": 2.0, "train_top1": 0.3}, {"epoch": 2, "train_loss": 1.0, "train_top1": ""}]
    fig = plot_history(rows, tmp_path / "c.png")
    assert len(fig.axes) == 2  # no lr panel
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train loss"]
    assert_non_blank_png(tmp_path / "c.png")
    plot_history([], tmp_path / "empty.png")  # a stage with no epochs does not crash
    assert (tmp_path / "empty.png").is_file()


def test_confusion_png(tmp_path):
    fig = plot_confusion(np.array([[3, 1], [0, 4]]), ["a", "b"], tmp_path / "confusion.png", "eval")
    assert fig.axes[0].get_xlabel() == "predicted"
    assert_non_blank_png(tmp_path / "confusion.png", min_size=(200, 200))
