"""The reference implementation's training and test path, re-stated from its documented behaviour.

kenshohara/3D-ResNets-PyTorch is what action3d reproduces; these functions say, in our own words, what its code does
to a video on the way to the network and to the weights in one step, so that tests/unit/test_reference_parity.py
and benchmarks/fidelity.py can hold our path against it. Nothing here is imported by the product.

Frame indices count from 0 here (the reference's JPEG files count from 1; only the offset differs).
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn


def loop_pad(indices: list[int], size: int) -> list[int]:
    """LoopPadding: repeat the clip's own frames, in order, until it holds `size` of them."""
    return [indices[i % len(indices)] for i in range(size)] if indices else []


def train_starts(n_frames: int, size: int) -> range:
    """TemporalRandomCrop's choices of a clip's first frame: random.randint(0, max(0, n - size - 1))."""
    return range(0, max(0, n_frames - size - 1) + 1)


def train_clip(n_frames: int, size: int, start: int) -> list[int]:
    """The frames of a training clip that starts at `start`: up to `size` frames, loop-padded."""
    return loop_pad(list(range(start, min(start + size, n_frames))), size)


def sliding_windows(n_frames: int, size: int) -> list[list[int]]:
    """SlidingWindow with its default stride (= size): every window from frame 0 on, the last one loop-padded when
    the video ends inside it; nothing after it."""
    windows = []
    for start in range(0, n_frames, size):
        windows.append(loop_pad(list(range(start, min(start + size, n_frames))), size))
        if start + size >= n_frames:
            break
    return windows


def corner_box(height: int, width: int, side: int, position: str) -> tuple[int, int]:
    """CornerCrop's (top, left) for a square of `side` pixels; the centre rounds half to even (Python's round)."""
    return {
        "c": (int(round((height - side) / 2.0)), int(round((width - side) / 2.0))),
        "tl": (0, 0), "tr": (0, width - side), "bl": (height - side, 0), "br": (height - side, width - side),
    }[position]


def _pil_frames(clip: torch.Tensor) -> list[Image.Image]:
    """uint8 [T, 3, H, W] -> the PIL images the reference's loader opens."""
    return [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in clip]


def _to_normalised(frames: Sequence[Image.Image], mean, std) -> torch.Tensor:
    """ToTensor (to [0, 1]), ScaleValue(1), Normalize(mean, std) per frame, stacked to [3, T, H, W]."""
    out = []
    for img in frames:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    return torch.stack(out, 0).permute(1, 0, 2, 3)


def train_transform(clip: torch.Tensor, *, size: int, scale: float, position: str, mean, std,
                    box: tuple[int, int] | None = None) -> torch.Tensor:
    """MultiScaleCornerCrop (side int(short side x scale) at `position`, PIL bilinear resize to size x size), the
    same draw for every frame of the clip, no flip, then normalisation. `box` (top, left) overrides the position's."""
    frames = _pil_frames(clip)
    width, height = frames[0].size
    side = int(min(width, height) * scale)
    top, left = box or corner_box(height, width, side, position)
    cropped = [f.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR) for f in frames]
    return _to_normalised(cropped, mean, std)


def eval_transform(clip: torch.Tensor, *, size: int, mean, std) -> torch.Tensor:
    """Resize(size): the short side to `size`, the long one to int(size x long / short), bilinear; CenterCrop(size)
    (torchvision's: offsets rounded); normalisation."""
    frames = _pil_frames(clip)
    width, height = frames[0].size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    out = []
    for f in frames:
        f = f.resize(new, Image.BILINEAR)
        top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
        out.append(f.crop((left, top, left + size, top + size)))
    return _to_normalised(out, mean, std)


def steps_per_epoch(n_videos: int, batch_size: int) -> int:
    """A DataLoader with shuffle and drop_last off: every video once, the last batch partial."""
    return -(-n_videos // batch_size)


def sgd(params, *, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool):
    """The reference's optimiser: SGD, dampening forced to 0 under Nesterov."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=0.0 if nesterov else dampening,
                           weight_decay=weight_decay, nesterov=nesterov)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, video: torch.Tensor, label: torch.Tensor) -> float:
    """One step of train_epoch: train mode, cross-entropy, zero_grad, backward, step; returns the loss."""
    model.train()
    loss = nn.CrossEntropyLoss()(model(video), label)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def video_scores(window_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """inference + eval_accuracy: the mean of the windows' softmax; its argmax is the video's class."""
    return torch.stack([torch.softmax(w, dim=-1) for w in window_logits]).mean(0)


def draw(rng: random.Random, choices: Sequence):
    """random.randint over a list, as the reference draws scales and positions."""
    return choices[rng.randint(0, len(choices) - 1)]
