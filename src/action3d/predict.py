"""Classify video files with a trained model: a registered version (`models:/<name>@champion`,
`models:/<name>/<version>`) or a checkpoint file (`runs/finetune/model.pt`); and what the served model answers.

    action3d predict clip.mp4 other.avi                       # the champion of params.yaml's registry.model_name
    action3d predict clip.mp4 --model runs/finetune/model.pt --topk 3 --timeline
    action3d predict *.mp4 --json

A model carries what it needs (its checkpoint's `card`: class names, clip frames, stride, crop, the short side of
its training frames, normalisation), so no params.yaml is read. A video is read as a stream: each frame is
decoded and scaled as the frame cache scales training videos, and every whole non-overlapping window of `frames x
stride` frames (the evaluate stage's windows) is centre-cropped, normalised and scored as soon as it is complete,
16 windows at a time, so a long video never sits in memory. The softmax is averaged over windows. A file that
cannot be classified is an error for that file alone: the others are still predicted.

Served (`mlflow models serve`, tracking.models), each request is hostile until shown otherwise (`ServePolicy`):
a row holds the video's bytes (`video_b64`); a `video` path or s3:// URI is read only under the roots the operator
named when starting the server (ACTION3D_SERVE_ROOTS), resolved first, and a path that is missing and one that is
not allowed get the same answer. Bytes per video, decoded seconds per video, rows per request and the seconds a
request may take are bounded; an error names neither a server path nor a bucket nor an endpoint.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from action3d.checkpoint import CheckpointError, read_checkpoint
from action3d.errors import Action3dError
from action3d.models.transfer import model_from_checkpoint

WINDOWS_PER_BATCH = 16


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
    jpeg_quality: int = 90  # the cache's JPEG (cache.quality): frames go through it as in training

    @classmethod
    def from_checkpoint(cls, ckpt: dict, where: str) -> Card:
        card = ckpt.get("card")
        if not isinstance(card, dict):
            raise PredictError(f"{where} carries no model card (class names, clip size): it was not written by a "
                               "training stage. Re-run its training stage (`dvc repro`) for a model that predicts")
        # a card written before jpeg_quality was one: the cache's default then and now
        return cls(**{k: card[k] for k in cls.__dataclass_fields__ if k in card or k != "jpeg_quality"})


def model_card(params: Any, classes: list[str]) -> dict[str, Any]:
    """The card a training stage stores in its checkpoints (key "card") besides the weights, so that `predict` and
    the served model classify a raw video with no params.yaml: class names in label order, the clip, the short side
    and JPEG quality of the training frames, the normalisation. `Card.from_checkpoint` reads it back."""
    from action3d.data.transforms import KINETICS_MEAN, KINETICS_STD

    return asdict(Card(classes=list(classes), clip_frames=params.clip.frames, stride=params.clip.stride,
                       crop_size=params.clip.crop_size, short_side=params.cache.short_side, mean=list(KINETICS_MEAN),
                       std=list(KINETICS_STD), jpeg_quality=params.cache.quality))


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


class TooLong(PredictError):
    """A video longer than the caller allows, or slower to classify than it may take."""


def scaled_frames(source: str | Path | io.BytesIO, short_side: int, *, quality: int | None = None,
                  max_seconds: float | None = None, deadline: float | None = None
                  ) -> tuple[Iterator[np.ndarray | torch.Tensor], float]:
    """(the frames one at a time, as the frame cache makes them: decoded and scaled by its `scaled_stream`, uint8
    [h, w, 3]; with `quality`, also through its JPEG at that quality, as the loaders read them: uint8 [3, h, w];
    the frame rate). A stream that goes on past `max_seconds` of video, or past the `deadline`
    (time.monotonic()), raises TooLong there."""
    import av

    from action3d.data.cache import as_cached, scaled_stream
    from action3d.data.video import VideoReadError

    try:
        container = av.open(source if isinstance(source, io.BytesIO) else str(source))
    except Exception as err:  # PyAV raises many types for a file that is not a video
        raise VideoReadError(source if not isinstance(source, io.BytesIO) else "video", f"{type(err).__name__}") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError("video", "no video stream")
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 25)
    # a stated rate is the file's word: capped, so that a file claiming a million fps still stops early
    max_frames = None if max_seconds is None else max(1, int(max_seconds * min(fps, 240.0)))

    def frames() -> Iterator[np.ndarray]:
        count = 0
        try:
            for frame in scaled_stream(container, stream, short_side):
                count += 1
                if max_frames is not None and count > max_frames:
                    raise TooLong(f"the video is longer than the limit of {max_seconds:g} s per video")
                if deadline is not None and time.monotonic() > deadline:
                    raise TooLong("not scored: the request took the time it may take; send shorter videos")
                yield frame if quality is None else as_cached(frame, quality)
        except (TooLong, GeneratorExit):
            raise
        except Exception as err:  # a corrupt packet part way: the frames before it stand, as in the cache
            if count <= 1:
                raise VideoReadError("video", f"{type(err).__name__}") from None
        finally:
            container.close()

    return frames(), fps


class Classifier:
    """A model and its card: `predict(path)` -> the top-k classes of the video and the label of every window."""

    def __init__(self, model: torch.nn.Module, card: Card, source: str):
        from action3d.data.transforms import EvalPreset

        self.model, self.card, self.source = model.eval(), card, source
        self.transform = EvalPreset(crop_size=card.crop_size, mean=card.mean, std=card.std)

    @classmethod
    def from_file(cls, path: str | Path, source: str | None = None) -> Classifier:
        where = str(source or path)
        try:
            ckpt = read_checkpoint(path)
            return cls(model_from_checkpoint(ckpt), Card.from_checkpoint(ckpt, where), where)
        except CheckpointError as err:
            raise PredictError(str(err)) from None

    def _window(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """One window's clip from its frames ([3, h, w] each; a short last window loops back to its own first
        frames, as the evaluate stage's loader pads it)."""
        from action3d.data.loaders import clip_indices

        picked = clip_indices(0, self.card.clip_frames, self.card.stride, len(frames))
        return self.transform(torch.stack([frames[i] for i in picked]))

    @torch.inference_mode()
    def probabilities(self, source: str | Path | io.BytesIO, **limits: float | None) -> tuple[np.ndarray, float]:
        """Softmax of every window [windows, classes] and the video's fps, the windows scored as the stream goes
        (`limits`: scaled_frames' max_seconds and deadline)."""
        frames, fps = scaled_frames(source, self.card.short_side, quality=self.card.jpeg_quality, **limits)
        span = self.card.clip_frames * self.card.stride
        window: list[torch.Tensor] = []
        batch: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []

        def flush() -> None:
            if batch:
                probs.append(torch.softmax(self.model(torch.stack(batch)).float(), dim=1))
                batch.clear()

        for frame in frames:
            window.append(frame)
            if len(window) == span:
                batch.append(self._window(window))
                window = []
                if len(batch) == WINDOWS_PER_BATCH:
                    flush()
        if not (probs or batch):  # a video shorter than one window: that one, loop-padded (frames left over after
            if not window:        # the last whole window are not scored, as in evaluation)
                raise PredictError("no decodable frame")
            batch.append(self._window(window))
        flush()
        return torch.cat(probs).numpy(), fps

    def predict(self, source: str | Path | io.BytesIO, *, topk: int = 5, name: str | None = None,
                **limits: float | None) -> Prediction:
        from action3d.data.video import VideoReadError

        try:
            probs, fps = self.probabilities(source, **limits)
        except VideoReadError as err:
            raise PredictError(f"{name or source}: not a video this can decode ({err.reason}). Give an mp4, avi, mkv "
                               "or webm file") from None
        video = probs.mean(axis=0)
        order = np.argsort(-video)[:topk]
        span = self.card.clip_frames * self.card.stride
        windows = [Window(round(i * span / fps, 3), round((i + 1) * span / fps, 3), self.card.classes[int(p.argmax())],
                          round(float(p.max()), 4)) for i, p in enumerate(probs)]
        return Prediction(str(name or source), [(self.card.classes[int(i)], round(float(video[i]), 4)) for i in order],
                          windows)


def load(path: str) -> Classifier:
    """A classifier from a checkpoint file (a registered model: `tracking.registry.load_classifier`)."""
    if not Path(path).is_file():
        raise PredictError(f"--model {path}: no such file. Give a checkpoint (runs/finetune/model.pt) or a registered "
                           "model: models:/<name>@champion or models:/<name>/<version>")
    return Classifier.from_file(path)


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


# --- serving: what a request may ask for ------------------------------------------------------------------------


def _number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        raise PredictError(f"{name}={text!r} is not a number") from None
    if value <= 0:
        raise PredictError(f"{name} must be positive, got {text}")
    return value


@dataclass(frozen=True)
class ServePolicy:
    """What the served model reads and how much, set by the operator when starting the server:

    ACTION3D_SERVE_ROOTS              folders and s3://bucket/prefix roots `video` may name, separated by commas
                                      (default none: only `video_b64`)
    ACTION3D_SERVE_MAX_MB             bytes per video, in MB (default 20)
    ACTION3D_SERVE_MAX_SECONDS        decoded seconds per video (default 60)
    ACTION3D_SERVE_MAX_ROWS           videos per request (default 8)
    ACTION3D_SERVE_REQUEST_SECONDS    seconds a request may spend; later rows are answered "not scored" (default 45,
                                      under MLflow's own 60 s request timeout)
    """

    roots: tuple[Path, ...] = ()
    buckets: tuple[tuple[str, str], ...] = ()  # (bucket, key prefix ending in "/" or "")
    max_bytes: int = 20 * 1024**2
    max_seconds: float = 60.0
    max_rows: int = 8
    request_seconds: float = 45.0

    @classmethod
    def from_env(cls) -> ServePolicy:
        roots, buckets = [], []
        for entry in filter(None, (e.strip() for e in os.environ.get("ACTION3D_SERVE_ROOTS", "").split(","))):
            if entry.startswith("s3://"):
                from action3d.storage import parse_s3_uri

                where = parse_s3_uri(entry)
                buckets.append((where.bucket, where.key.rstrip("/") + "/" if where.key.strip("/") else ""))
            else:
                roots.append(Path(entry).expanduser().resolve())
        return cls(tuple(roots), tuple(buckets), int(_number("ACTION3D_SERVE_MAX_MB", 20) * 1024**2),
                   _number("ACTION3D_SERVE_MAX_SECONDS", 60), int(_number("ACTION3D_SERVE_MAX_ROWS", 8)),
                   _number("ACTION3D_SERVE_REQUEST_SECONDS", 45))

    def allows_path(self, text: str) -> Path | None:
        """The file `text` names (a path or file:// URI), resolved, when it lies under an allowed root; else None."""
        path = Path(text.removeprefix("file://")).expanduser()
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        inside = any(resolved == root or resolved.is_relative_to(root) for root in self.roots)
        return resolved if inside and resolved.is_file() else None

    def allows_s3(self, uri: str) -> bool:
        from action3d.storage import parse_s3_uri

        try:
            where = parse_s3_uri(uri)
        except ValueError:
            return False
        parts = where.key.split("/")
        if not where.key or ".." in parts or "." in parts or "" in parts[:-1]:
            return False  # keys a server could read as another path
        return any(where.bucket == bucket and where.key.startswith(prefix) for bucket, prefix in self.buckets)


NOT_READABLE = ("not a file this server may read: send the video's bytes as video_b64 (the operator allows paths "
                "and s3:// URIs under ACTION3D_SERVE_ROOTS)")
NO_VIDEO = "each row needs a 'video_b64' (the file, base64) or a 'video' the server may read"


def _source(row: dict, policy: ServePolicy) -> io.BytesIO | Path:
    """The row's video as bytes in memory or an allowed local file; PredictError (saying nothing of the server's
    files, buckets or endpoints) otherwise."""
    encoded, video = row.get("video_b64"), row.get("video")
    if isinstance(encoded, str) and encoded:
        if len(encoded) * 3 // 4 > policy.max_bytes:  # refused before any decoding
            raise PredictError(f"video_b64 is over the limit of {policy.max_bytes // 1024**2} MB per video")
        try:
            return io.BytesIO(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            raise PredictError("video_b64 is not base64: send the file's bytes base64-encoded") from None
    if not isinstance(video, str) or not video:
        raise PredictError(NO_VIDEO)
    if video.startswith("s3://"):
        if not policy.allows_s3(video):
            raise PredictError(NOT_READABLE)
        return _fetch_s3(video, policy)
    path = policy.allows_path(video)
    if path is None:
        raise PredictError(NOT_READABLE)
    if path.stat().st_size > policy.max_bytes:
        raise PredictError(f"the video is over the limit of {policy.max_bytes // 1024**2} MB per video")
    return path


def _fetch_s3(uri: str, policy: ServePolicy) -> io.BytesIO:
    import tempfile

    from action3d.storage import StorageError, TooLarge, download

    with tempfile.TemporaryDirectory(prefix="action3d-serve-") as folder:
        try:
            path = download(uri, Path(folder) / "video", max_bytes=policy.max_bytes)
        except TooLarge:
            raise PredictError(f"the video is over the limit of {policy.max_bytes // 1024**2} MB per video") from None
        except StorageError:  # no such object, or the store refused or is down: one answer, nothing internal
            raise PredictError(NOT_READABLE) from None
        return io.BytesIO(path.read_bytes())


def _error(message: str) -> dict[str, Any]:
    return {"label": "", "probability": 0.0, "top_classes": [], "top_probabilities": [], "error": message}


def answer_rows(classifier: Classifier, rows: list[dict], params: dict, policy: ServePolicy | None = None
                ) -> list[dict[str, Any]]:
    """The served model's answer: one row per video (label, probability, top-k, error). Never raises: a request
    the policy refuses is answered with an error in every row (MLflow would send a raised error's stack trace)."""
    policy = policy or ServePolicy.from_env()
    try:
        topk = int(params.get("topk", 5))
    except (TypeError, ValueError):
        topk = 0
    if topk < 1:
        return [_error("params.topk must be a whole number >= 1")] * max(1, len(rows))
    if not rows:  # MLflow drops the columns its signature does not name: a request without ours arrives empty
        return [_error(NO_VIDEO)]
    if len(rows) > policy.max_rows:
        return [_error(f"the request holds {len(rows)} rows, over the limit of {policy.max_rows}: send fewer videos "
                       "per request")] * len(rows)
    deadline = time.monotonic() + policy.request_seconds
    answers = []
    for row in rows:
        if time.monotonic() > deadline:
            answers.append(_error(f"not scored: the request took its {policy.request_seconds:.0f} s; send fewer or "
                                  "shorter videos per request"))
            continue
        try:
            result = classifier.predict(_source(row, policy), topk=topk, name="video", max_seconds=policy.max_seconds,
                                        deadline=deadline)
        except (Action3dError, ValueError, RuntimeError, OSError, MemoryError) as err:
            answers.append(_error(_public(err)))
            continue
        answers.append({"label": result.top[0][0], "probability": result.top[0][1],
                        "top_classes": [name for name, _ in result.top],
                        "top_probabilities": [p for _, p in result.top], "error": ""})
    return answers


def _public(err: Exception) -> str:
    """An error's message as a client may read it: a PredictError's own words; for anything else, its kind only."""
    if isinstance(err, PredictError):
        return str(err)
    return f"the video could not be classified ({type(err).__name__})"
