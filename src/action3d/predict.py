"""Classify video files with a trained model: a registered version (`models:/<name>@champion`,
`models:/<name>/<version>`) or a checkpoint file (`runs/finetune/model.pt`).

    action3d predict clip.mp4 other.avi                       # the champion of params.yaml's registry.model_name
    action3d predict clip.mp4 --model runs/finetune/model.pt --topk 3 --timeline
    action3d predict *.mp4 --json

A model carries what it needs (its checkpoint's `card`: class names, clip frames, stride, crop, the short side of
its training frames, normalisation), so no params.yaml is read. Each video is decoded with PyAV and scaled as the
frame cache scales training videos, cut into every non-overlapping window of `frames x stride` frames (the
evaluate stage's windows), centre-cropped and normalised as at evaluation; the softmax is averaged over windows.
A file that cannot be classified is an error for that file alone: the others are still predicted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from action3d.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from action3d.errors import Action3dError


class PredictError(Action3dError):
    """A video or a model that cannot be used, named, with what to do."""


@dataclass(frozen=True)
class Card:
    """What a model needs to classify a raw video, stored in its checkpoint (`card`) by the training stages."""

    classes: list[str]
    clip_frames: int
    stride: int
    crop_size: int
    short_side: int
    mean: list[float]
    std: list[float]

    @classmethod
    def from_checkpoint(cls, ckpt: dict, where: str) -> Card:
        card = ckpt.get("card")
        if not isinstance(card, dict):
            raise PredictError(f"{where} carries no model card (class names, clip size): it was written before "
                               "checkpoints held one. Re-run its training stage (`dvc repro`) to get a model that "
                               "predicts on its own")
        return cls(**{k: card[k] for k in cls.__dataclass_fields__})


@dataclass
class Window:
    start_s: float
    end_s: float
    label: str
    probability: float


@dataclass
class Prediction:
    video: str
    top: list[tuple[str, float]] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    error: str | None = None


class Classifier:
    """A model and its card: `predict(path)` -> the top-k classes of the video and the label of every window."""

    def __init__(self, model: torch.nn.Module, card: Card, source: str):
        self.model, self.card, self.source = model.eval(), card, source
        from action3d.data.transforms import EvalPreset

        self.transform = EvalPreset(crop_size=card.crop_size, mean=card.mean, std=card.std)

    @classmethod
    def from_file(cls, path: str | Path, source: str | None = None) -> Classifier:
        where = str(source or path)
        try:
            ckpt = read_checkpoint(path)
            card = Card.from_checkpoint(ckpt, where)
            model = model_from_checkpoint(ckpt)
        except CheckpointError as err:
            raise PredictError(str(err)) from None
        return cls(model, card, where)

    def windows(self, frames: int, fps: float) -> list[int]:
        """Start frames of every non-overlapping window (the evaluate stage's, via the same function)."""
        from action3d.data.loaders import window_starts

        return window_starts(frames, fps, self.card.clip_frames, self.card.stride)

    @torch.inference_mode()
    def probabilities(self, path: str | Path) -> tuple[np.ndarray, list[int], float]:
        """Softmax of every window [windows, classes], the windows' start frames and the fps."""
        from action3d.data.cache import decode_scaled
        from action3d.data.video import VideoReadError

        try:
            decoded = decode_scaled(path, self.card.short_side)
        except VideoReadError as err:
            raise PredictError(f"{path}: not a video this can decode ({err.reason}). Give an mp4, avi, mkv or webm "
                               "file") from None
        frames = torch.from_numpy(decoded.frames)  # [N, H, W, 3] uint8
        starts = self.windows(len(frames), decoded.fps)
        from action3d.data.loaders import clip_indices

        probs = []
        for i in range(0, len(starts), 16):  # 16 windows at a time: a long video never sits in memory as floats
            batch = [self.transform(frames[clip_indices(start, self.card.clip_frames, self.card.stride,
                                                        len(frames))].permute(0, 3, 1, 2)) for start in starts[i:i + 16]]
            probs.append(torch.softmax(self.model(torch.stack(batch)).float(), dim=1))
        return torch.cat(probs).numpy(), starts, decoded.fps

    def predict(self, path: str | Path, *, topk: int = 5) -> Prediction:
        probs, starts, fps = self.probabilities(path)
        video = probs.mean(axis=0)
        order = np.argsort(-video)[:topk]
        length = self.card.clip_frames * self.card.stride
        windows = [Window(round(s / fps, 3), round((s + length) / fps, 3), self.card.classes[int(p.argmax())],
                          round(float(p.max()), 4)) for s, p in zip(starts, probs)]
        return Prediction(str(path), [(self.card.classes[int(i)], round(float(video[i]), 4)) for i in order], windows)


def load(spec: str, *, tracking_uri: str | None = None) -> Classifier:
    """A classifier from `models:/<name>@<alias>`, `models:/<name>/<version>` or a checkpoint file."""
    if spec.startswith("models:/"):
        import os
        import tempfile

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar

        from action3d.stages.common import tracking_uri as default_uri
        from action3d.tracking import download_version_checkpoint, registry_versions

        uri = tracking_uri or default_uri()
        with tempfile.TemporaryDirectory(prefix="action3d-model-") as folder:
            path = download_version_checkpoint(spec, tracking_uri=uri, dst=folder)
            try:
                return Classifier.from_file(path, source=spec)
            except PredictError as err:
                name = spec[len("models:/"):].split("@")[0].split("/")[0]
                newest = registry_versions(name, tracking_uri=uri)[0]["version"]
                raise PredictError(f"{err}. Or use a newer version: --model models:/{name}/{newest} "
                                   "(`action3d registry list` shows them all)") from None
    if not Path(spec).is_file():
        raise PredictError(f"--model {spec}: no such file. Give a checkpoint (runs/finetune/model.pt) or a registered "
                           "model: models:/<name>@champion or models:/<name>/<version>")
    return Classifier.from_file(spec)


def predict_files(classifier: Classifier, videos: list[str], *, topk: int = 5) -> list[Prediction]:
    """Every video's prediction; a video that fails is a Prediction with `error`, the others go on."""
    results = []
    for video in videos:
        try:
            results.append(classifier.predict(video, topk=topk))
        except (PredictError, RuntimeError, ValueError, MemoryError) as err:
            results.append(Prediction(str(video), error=str(err)))
    return results


def format_predictions(results: list[Prediction], *, timeline: bool) -> str:
    lines = []
    for result in results:
        if result.error:
            lines.append(f"{result.video}: error: {result.error}")
            continue
        lines.append(f"{result.video}: {result.top[0][0]} ({result.top[0][1]:.1%})")
        lines += [f"    {name:<24} {prob:6.1%}" for name, prob in result.top]
        if timeline:
            lines += [f"    {w.start_s:7.2f}-{w.end_s:7.2f} s  {w.label:<24} {w.probability:6.1%}" for w in result.windows]
    return "\n".join(lines)


def to_json(results: list[Prediction]) -> str:
    return json.dumps([asdict(r) for r in results], indent=1)
