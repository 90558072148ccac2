"""metrics.py: the paper's video-level aggregation, top-k, confusion matrix, per-class accuracy, scalar metrics."""

import numpy as np
import pytest

from action3d.metrics import (
    confusion_matrix,
    per_class_accuracy,
    scalar_metrics,
    sum_by_video,
    topk_accuracy,
    video_level_scores,
)


def test_video_level_scores_average_clip_softmax_per_video():
    # video 7: two clips, each alone says class 0 weakly and class 1 strongly once -> mean picks class 1
    probs = np.array(
        [
            [0.5, 0.4, 0.1, 0.0],  # video 7
            [0.1, 0.8, 0.1, 0.0],  # video 7
            [0.1, 0.3, 0.6, 0.0],  # video 2 (only clip)
            [0.4, 0.3, 0.2, 0.1],  # video 5
            [0.4, 0.1, 0.2, 0.3],  # video 5
            [0.0, 0.3, 0.3, 0.4],  # video 5
        ]
    )
    index = np.array([7, 7, 2, 5, 5, 5])
    labels = np.array([1, 1, 0, 3, 3, 3])
    scores = video_level_scores(probs, index, labels)
    assert scores.video_index.tolist() == [2, 5, 7]
    np.testing.assert_allclose(scores.probs[2], [0.3, 0.6, 0.1, 0.0])
    np.testing.assert_allclose(scores.probs[1], [0.8 / 3, 0.7 / 3, 0.7 / 3, 0.8 / 3])
    assert scores.labels.tolist() == [0, 3, 1]
    # predictions: video 2 -> 2 (wrong), video 5 -> tie of 0 and 3 -> 0 (first), video 7 -> 1 (right)
    assert topk_accuracy(scores.probs, scores.labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores.probs, scores.labels, 2) == pytest.approx(2 / 3)  # video 5's 3 is second
    assert topk_accuracy(scores.probs, scores.labels, 5) == 1.0  # k capped at 4 classes
    matrix = confusion_matrix(scores.labels, scores.probs.argmax(1), 4)
    assert matrix.tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    per_class = per_class_accuracy(matrix)
    assert per_class[1] == 1.0 and per_class[0] == 0.0 and per_class[3] == 0.0 and np.isnan(per_class[2])
    with pytest.raises(ValueError, match="video 7"):
        video_level_scores(probs, index, np.array([1, 2, 0, 3, 3, 3]))


def test_sum_by_video_merges_partial_sums_from_ranks():
    # rank 0 saw two clips of video 3 and one of video 1; rank 1 one more clip of video 3
    rank0 = sum_by_video(np.array([3, 1, 3]), np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]]), np.ones(3),
                         np.array([1, 0, 1]))
    rank1 = sum_by_video(np.array([3]), np.array([[0.3, 0.7]]), np.ones(1), np.array([1]))
    videos, sums, counts, labels = sum_by_video(*(np.concatenate(x) for x in zip(rank0, rank1)))
    assert videos.tolist() == [1, 3] and counts.tolist() == [1, 3] and labels.tolist() == [0, 1]
    np.testing.assert_allclose(sums / counts[:, None], [[0.9, 0.1], [0.3, 0.7]])


def test_topk_of_nothing_is_nan_and_shapes_are_checked():
    assert np.isnan(topk_accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int), 1))
    with pytest.raises(ValueError, match=r"clip_probs \[N, C\]"):
        video_level_scores(np.zeros(4), np.zeros(4), np.zeros(4))


def test_scalar_metrics_drops_arrays_and_prefixes_keys():
    metrics = {"loss": 0.5, "clips": 10, "top1": np.float32(0.25), "confusion_matrix": np.eye(2), "name": "x"}
    assert scalar_metrics(metrics, "val_") == {"val_loss": 0.5, "val_clips": 10.0, "val_top1": 0.25}
