"""The registered model as a service: an MLflow pyfunc that takes videos and answers with class names.

Each training run logs two MLflow models: `model`, the plain PyTorch module on clip tensors (tracking.StageRun.
log_model), and `video_classifier`, this module's `VideoModel`: the run's checkpoint with its card behind
`action3d.predict.Classifier`, so it decodes a video, scores every window as the evaluate stage does and averages
the softmax. The register stage registers `video_classifier`, so the champion serves videos:

    mlflow models serve -m models:/action3d-demo@champion --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"video": "/data/clip.mp4"}], "params": {"topk": 3}}'
    # or the file itself: {"dataframe_records": [{"video_b64": "'$(base64 -w0 clip.mp4)'"}]}

A row holds `video` (a path on the server, file:// or s3:// URI; S3 endpoint and keys from AWS_* as everywhere)
or `video_b64` (the file's bytes, base64). The answer has one row per video: `label`, `probability`,
`top_classes`, `top_probabilities` (top-k, `params.topk`, default 5) and `error`: empty, or why that one video
could not be classified (its label is then empty too); the other rows are still answered.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

NAME = "video_classifier"  # the logged model the register stage registers
COLUMNS = ("video", "video_b64")


class VideoModel(mlflow.pyfunc.PythonModel):
    """pyfunc: rows of `video` (path/URI) or `video_b64` (bytes) -> label, probability, top-k, error."""

    def load_context(self, context) -> None:
        from action3d.predict import Classifier

        self.classifier = Classifier.from_file(context.artifacts["checkpoint"], source="the served model")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        topk = int((params or {}).get("topk", 5))
        if topk < 1:
            raise ValueError(f"params.topk must be at least 1, got {topk}")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if not any(column in frame.columns for column in COLUMNS):
            raise ValueError(f"each row needs a 'video' (path or s3:// URI) or a 'video_b64' (the file, base64) "
                             f"column; got columns {list(frame.columns)}")
        return pd.DataFrame([self._answer(row, topk) for row in frame.to_dict("records")])

    def _answer(self, row: dict, topk: int) -> dict[str, Any]:
        from action3d.errors import Action3dError

        try:
            with _local_video(row) as path:
                result = self.classifier.predict(path, topk=topk)
        except (Action3dError, ValueError, OSError, RuntimeError) as err:  # a bad video, an S3 object not there
            return {"label": "", "probability": 0.0, "top_classes": [], "top_probabilities": [],
                    "error": str(err)}
        return {"label": result.top[0][0], "probability": result.top[0][1],
                "top_classes": [name for name, _ in result.top], "top_probabilities": [p for _, p in result.top],
                "error": ""}


class _local_video:
    """The row's video as a local file: the path itself, or a temporary copy of an s3:// object or of the bytes."""

    def __init__(self, row: dict):
        self.row, self.folder = row, None

    def __enter__(self) -> Path:
        video, encoded = self.row.get("video"), self.row.get("video_b64")
        if isinstance(encoded, str) and encoded:
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("video_b64 is not base64: send the file's bytes base64-encoded") from None
            self.folder = tempfile.TemporaryDirectory(prefix="action3d-serve-")
            path = Path(self.folder.name) / "video"  # the container is found from the bytes, not the name
            path.write_bytes(data)
            return path
        if not isinstance(video, str) or not video:
            raise ValueError("the row has neither 'video' nor 'video_b64'")
        if video.startswith("s3://"):
            from action3d.storage import download

            self.folder = tempfile.TemporaryDirectory(prefix="action3d-serve-")
            target = Path(self.folder.name) / Path(video).name
            try:
                download(video, target, progress=False)
            except BaseException:
                self.folder.cleanup()  # __exit__ does not run when __enter__ fails
                raise
            return target
        path = Path(video.removeprefix("file://"))
        if not path.is_file():
            raise ValueError(f"{video}: no such file on the server; send the bytes as 'video_b64' instead")
        return path

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            self.folder.cleanup()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.string, "video", required=False),
                     ColSpec(DataType.string, "video_b64", required=False)])
    outputs = Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"),
                      ColSpec(Array(DataType.string), "top_classes"),
                      ColSpec(Array(DataType.double), "top_probabilities"), ColSpec(DataType.string, "error")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("topk", "long", 5)]))


def example_video(card: dict) -> bytes:
    """A short mp4 (two windows long, at the model's short side) as the logged model's input example."""
    from action3d.data.video import write_video

    side = max(16, card["short_side"] + card["short_side"] % 2)
    frames = 2 * card["clip_frames"] * card["stride"]
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    clip = [np.stack([np.roll(ramp, 4 * t)[None, :].repeat(side, 0)] * 3, axis=-1).astype(np.uint8)
            for t in range(frames)]
    with tempfile.TemporaryDirectory(prefix="action3d-example-") as folder:
        path = Path(folder) / "example.mp4"
        write_video(path, clip, fps=25, gop=frames)
        return path.read_bytes()


def log_video_model(checkpoint: str | Path, card: dict, *, metadata: dict | None = None) -> str:
    """Log `checkpoint` (a training stage's model.pt, with its card) as the video-in pyfunc in the active run;
    returns its models:/ URI. The input example (a generated video) is scored once while logging: a model that
    cannot serve fails here, not in production."""
    example = pd.DataFrame({"video_b64": [base64.b64encode(example_video(card)).decode()]})
    info = mlflow.pyfunc.log_model(
        name=NAME,
        python_model=VideoModel(),
        artifacts={"checkpoint": str(checkpoint)},
        signature=signature(),
        input_example=(example, {"topk": 5}),
        # serve with `--env-manager local` in the project's venv: action3d itself is not on an index
        pip_requirements=mlflow.pytorch.get_default_pip_requirements() + ["av"],
        metadata={"input": "videos: a 'video' path/URI or 'video_b64' column", "classes": card["classes"],
                  **(metadata or {})},
    )
    return info.model_uri


def load_module(uri: str):
    """The torch module inside a logged video model (for tracking.load_registered_model)."""
    model = mlflow.pyfunc.load_model(uri)
    if model.metadata.flavors["python_function"].get("loader_module") != "mlflow.pyfunc.model":
        # a tensor-in model (tracking.StageRun.log_model): the module itself, on the CPU as the caller's tensors are
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    return model.unwrap_python_model().classifier.model  # read_checkpoint loads onto the CPU

