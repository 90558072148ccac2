"""metrics.py: the paper's video-level aggregation, top-k, confusion matrix, per-class accuracy, scalar metrics,
and the arithmetic of intervals and the paired test on inputs whose answers are known."""

import numpy as np
import pytest

from action3d.metrics import (
    bootstrap_interval,
    confusion_matrix,
    mcnemar_exact,
    paired_difference,
    per_class_accuracy,
    scalar_metrics,
    sum_by_video,
    topk_accuracy,
)


def video_level_scores(probs, index, labels):
    videos, sums, counts, video_labels = sum_by_video(index, probs, np.ones(len(labels)), labels)
    return videos, sums / counts[:, None], video_labels


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
    videos, video_probs, video_labels = video_level_scores(probs, index, labels)
    assert videos.tolist() == [2, 5, 7]
    np.testing.assert_allclose(video_probs[2], [0.3, 0.6, 0.1, 0.0])
    np.testing.assert_allclose(video_probs[1], [0.8 / 3, 0.7 / 3, 0.7 / 3, 0.8 / 3])
    assert video_labels.tolist() == [0, 3, 1]
    # predictions: video 2 -> 2 (wrong), video 5 -> tie of 0 and 3 -> 0 (first), video 7 -> 1 (right)
    assert topk_accuracy(video_probs, video_labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(video_probs, video_labels, 2) == pytest.approx(2 / 3)  # video 5's 3 is second
    assert topk_accuracy(video_probs, video_labels, 5) == 1.0  # k capped at 4 classes
    matrix = confusion_matrix(video_labels, video_probs.argmax(1), 4)
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


def test_topk_of_nothing_is_nan():
    assert np.isnan(topk_accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int), 1))


def test_scalar_metrics_drops_arrays_and_prefixes_keys():
    metrics = {"loss": 0.5, "clips": 10, "top1": np.float32(0.25), "confusion_matrix": np.eye(2), "name": "x"}
    assert scalar_metrics(metrics, "val_") == {"val_loss": 0.5, "val_clips": 10.0, "val_top1": 0.25}


def test_a_bootstrap_interval_brackets_the_accuracy_as_the_binomial_says():
    assert bootstrap_interval(np.ones(140)) == (1.0, 1.0)  # nothing varies when every video is right
    half = np.array([1, 0] * 70)
    low, high = bootstrap_interval(half)
    # the normal approximation of a binomial proportion: 0.5 +- 1.96 * sqrt(0.25 / 140) = 0.5 +- 0.083
    assert low == pytest.approx(0.417, abs=0.012) and high == pytest.approx(0.583, abs=0.012)
    assert bootstrap_interval(half) == (low, high)  # seeded: the same input, the same interval
    wider = bootstrap_interval(np.array([1, 0] * 10))  # 20 videos say less than 140
    assert wider[0] < low and wider[1] > high


def test_mcnemar_counts_only_the_videos_the_models_disagree_on():
    right, wrong = np.ones(50, dtype=bool), np.ones(50, dtype=bool)
    wrong[:10] = False  # 10 videos only a gets right, none only b: p = 2 / 2**10
    assert mcnemar_exact(right, wrong) == pytest.approx(2 / 1024)
    a = np.array([1] * 8 + [0] * 2 + [1] * 30, dtype=bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 30, dtype=bool)  # 8 against 2: p = 2 (1 + 10 + 45) / 1024
    assert mcnemar_exact(a, b) == pytest.approx(2 * 56 / 1024)
    assert mcnemar_exact(a, a) == 1.0  # no disagreement: no evidence
    assert mcnemar_exact(np.array([1, 1, 1, 0, 0, 0]), np.array([0, 0, 0, 1, 1, 1])) == 1.0  # 3 against 3


def test_a_paired_difference_and_when_its_interval_holds_zero():
    a = np.array([1] * 100 + [0] * 40)  # 140 videos: a right on 100
    b = np.array([1] * 60 + [0] * 80)  # b right on 60, all of them also right for a
    gain = paired_difference(a, b)
    assert gain["difference"] == pytest.approx(40 / 140)
    assert 0 < gain["low"] < gain["difference"] < gain["high"]  # shown: the interval excludes 0
    assert gain["p_value"] < 1e-6
    tie = paired_difference(np.array([1, 0] * 70), np.array([0, 1] * 70))  # same accuracy, other videos
    assert tie["difference"] == 0 and tie["low"] < 0 < tie["high"] and tie["p_value"] == 1.0
    with pytest.raises(ValueError, match="same videos"):
        paired_difference(np.ones(3), np.ones(4))
