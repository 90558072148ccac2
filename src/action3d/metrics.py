"""Metrics of a classifier's scores: the paper's video-level aggregation, top-k, confusion matrix, per-class
accuracy. Pure numpy: the engine feeds them, the stages report them.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np


class VideoScores(NamedTuple):
    """Per-video scores: `video_index` [V] (sorted), `probs` [V, C] (mean clip softmax), `labels` [V]."""

    video_index: np.ndarray
    probs: np.ndarray
    labels: np.ndarray


def sum_by_video(
    video_index: np.ndarray, probs: np.ndarray, counts: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by video: (videos [V] sorted, summed probs [V, C], summed counts [V], labels [V]).

    Rows are clips (counts 1) or partial per-video sums from other ranks (counts = their clips)."""
    videos, row = np.unique(video_index, return_inverse=True)
    sums = np.zeros((len(videos), probs.shape[1]), dtype=np.float64)
    np.add.at(sums, row, probs)
    video_labels = np.full(len(videos), -1, dtype=np.int64)
    video_labels[row] = labels
    mismatch = video_labels[row] != labels
    if mismatch.any():
        bad = int(video_index[np.argmax(mismatch)])
        raise ValueError(f"video {bad} has clips with different labels: check the manifest row {bad}")
    return videos, sums, np.bincount(row, weights=counts, minlength=len(videos)), video_labels


def video_level_scores(clip_probs: np.ndarray, video_index: np.ndarray, labels: np.ndarray) -> VideoScores:
    """Average the clip softmax scores of each video, as the paper does over every window of a video.

    clip_probs [N, C] (rows sum to 1), video_index [N] (which video each clip came from), labels [N]. Every clip
    of a video must carry the same label. Returns the videos sorted by index.
    """
    clip_probs, video_index, labels = np.asarray(clip_probs), np.asarray(video_index), np.asarray(labels)
    if clip_probs.ndim != 2 or not (len(clip_probs) == len(video_index) == len(labels)):
        raise ValueError(
            f"expected clip_probs [N, C], video_index [N], labels [N]; got shapes {clip_probs.shape}, "
            f"{video_index.shape}, {labels.shape}"
        )
    videos, sums, counts, video_labels = sum_by_video(video_index, clip_probs, np.ones(len(labels)), labels)
    return VideoScores(videos, sums / counts[:, None], video_labels)


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest scores (k is capped at the number of classes)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """float [C]: recall of each class from a confusion matrix; NaN for a class with no samples."""
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / totals, np.nan)


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The scalar entries of a metrics dict (drops arrays), keys prefixed: for history, logs and metrics.json."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number))}
