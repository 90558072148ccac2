"""The project's charts, as PNG files (matplotlib, Agg backend): `dvc plots show` embeds .png plot files in its
HTML as plain images, so they render offline (its Vega charts load their JavaScript from a CDN).

Each function writes its PNG atomically (a temp file beside it, then a rename) and returns the figure, closed,
so tests can inspect its axes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from action3d.atomic import replacing

# history key -> legend label, for the panels of `plot_history`
_LOSSES = {"train_loss": "train loss", "val_loss": "val loss (clips)"}
_ACCURACIES = {"train_top1": "train top-1 (clips)", "val_top1": "val top-1 (clips)",
               "val_video_top1": "val top-1 (videos)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 120) -> None:
    plt = _pyplot()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the rows holding a finite number under `key`."""
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            xs.append(float(row.get("epoch", i + 1)))
            ys.append(value)
    return xs, ys


def spans_decades(values: Iterable[float], decades: float = 1.0) -> bool:
    """Whether positive `values` span at least `decades` powers of ten (a log axis reads them better)."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return len(positive) > 1 and math.log10(max(positive) / min(positive)) >= decades


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "training"):
    """One PNG of a training stage's curves from its history rows (the engine's per-epoch metrics): loss
    (train and val; log y axis when the values span a decade or more, so epoch 1 does not flatten the rest),
    top-1 accuracy on [0, 1] (train clips, val clips, val videos) and, when logged, the learning rate (log y
    axis). Missing keys are skipped. Returns the (closed) figure."""
    plt = _pyplot()
    has_lr = any(v > 0 for v in _series(history, "lr")[1])
    fig, axes = plt.subplots(1, 3 if has_lr else 2, figsize=(13 if has_lr else 9.5, 3.8))
    loss_ax, acc_ax = axes[0], axes[1]

    losses = []
    for key, label in _LOSSES.items():
        xs, ys = _series(history, key)
        if xs:
            loss_ax.plot(xs, ys, marker="o", markersize=3, label=label)
            losses += ys
    if spans_decades(losses) and min(losses) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set_title("loss" + (" (log scale)" if loss_ax.get_yscale() == "log" else ""))
    loss_ax.set_ylabel("cross-entropy loss")

    for key, label in _ACCURACIES.items():
        xs, ys = _series(history, key)
        if xs:
            acc_ax.plot(xs, ys, marker="o", markersize=3, label=label)
    acc_ax.set_ylim(0, 1)
    acc_ax.set_title("top-1 accuracy")
    acc_ax.set_ylabel("accuracy")

    if has_lr:
        lr_ax = axes[2]
        xs, ys = _series(history, "lr")
        lr_ax.plot(xs, ys, marker="o", markersize=3, color="tab:gray", label="learning rate")
        if min(ys) > 0 and spans_decades(ys, 0.5):
            lr_ax.set_yscale("log")
        lr_ax.set_title("learning rate")
        lr_ax.set_ylabel("learning rate")

    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{title}: {len(history)} epochs" if history else f"{title}: no epochs")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_confusion(matrix: np.ndarray, classes: list[str], path: str | Path, title: str):
    """The row-normalised confusion matrix (counts written in the cells) as a PNG. Returns the (closed) figure."""
    plt = _pyplot()
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.45 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title, fontsize=9)
    for i, j in zip(*np.nonzero(matrix)):
        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the actual class")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_study(rows: list[dict[str, Any]], path: str | Path, title: str = "architecture study"):
    """Fine-tuned video top-1 against forward GFLOPs per clip, one labelled point per model (the paper's
    depth/family comparison); the scratch baseline as hollow points when present. Failed rows are left out.
    Returns the (closed) figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    done = [r for r in rows if r.get("status") == "ok" and r.get("finetune.video_top1") is not None]
    for row in done:
        x = row.get("gflops") or 0.0
        ax.scatter([x], [row["finetune.video_top1"]], s=40, color="tab:blue")
        ax.annotate(row["entry"], (x, row["finetune.video_top1"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
        if row.get("scratch.video_top1") is not None:
            ax.scatter([x], [row["scratch.video_top1"]], s=40, facecolors="none", edgecolors="tab:orange")
    ax.scatter([], [], color="tab:blue", label="fine-tuned")
    ax.scatter([], [], facecolors="none", edgecolors="tab:orange", label="from scratch")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("forward GFLOPs per clip")
    ax.set_ylabel("video top-1 (test)")
    failed = len(rows) - len(done)
    ax.set_title(f"{title}: {len(done)} models" + (f", {failed} failed" if failed else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    return fig
