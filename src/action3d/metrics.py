"""Metrics of a classifier's scores: the paper's video-level aggregation, top-k, confusion matrix, per-class
accuracy, and how sure an accuracy is (bootstrap intervals, a paired test). Pure numpy: the engine feeds them, the
stages report them.
"""

from __future__ import annotations

import math
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


# --- how sure a test accuracy is: intervals over the test videos, and a paired test of two models -------------------


def bootstrap_interval(correct: np.ndarray, *, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy: `correct` holds 1/0 per test video, resampled with
    replacement `resamples` times (seeded: the same input gives the same interval)."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.size == 0:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, correct.size, (resamples, correct.size))
    means = correct[draws].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value of two models scored on the same videos (1/0 per video each): the videos
    only one of them gets right are, under "no difference", a fair coin's tosses."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(a: np.ndarray, b: np.ndarray, *, level: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """Accuracy of model a minus model b on the same test videos (1/0 per video each, same order): the difference,
    its paired bootstrap interval (the same resampled videos for both) and McNemar's exact p-value."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same videos: {a.shape} against {b.shape}")
    low, high = bootstrap_interval(a - b, level=level, resamples=resamples, seed=seed)
    return {"difference": float((a - b).mean()), "low": low, "high": high, "p_value": mcnemar_exact(a, b)}
