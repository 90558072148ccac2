"""The model a training run logs, once: an MLflow pyfunc that takes videos and answers with class names.

Each training run logs one MLflow model, `model`: the run's checkpoint (weights and the model card) behind
`action3d.predict.Classifier`, so it decodes a video, scores every window as the evaluate stage does and averages
the softmax. The registry registers it, `mlflow models serve` serves it, re-scoring and `action3d predict` read its
checkpoint (`download_checkpoint`), and the torch module is one call away:

    from action3d.tracking.models import load_module
    net = load_module("models:/action3d-demo@champion")   # an nn.Module in eval mode, on the CPU: [B, 3, T, H, W]

Serving (`mlflow models serve -m models:/action3d-demo@champion --env-manager local`): the README's "Serving"
section and `action3d.predict` say what a request may hold and what is refused.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
import pandas as pd

NAME = "model"  # the logged model of a training run: what the register stage registers
CHECKPOINT = "checkpoint"  # its artifact key: <model>/artifacts/<the checkpoint's file name>


class VideoModel(mlflow.pyfunc.PythonModel):
    """pyfunc: rows of `video_b64` (the file's bytes) or `video` (a path or URI the operator allows) -> label,
    probability, top-k classes and probabilities, error."""

    def load_context(self, context) -> None:
        from action3d.predict import Classifier

        self.classifier = Classifier.from_file(context.artifacts[CHECKPOINT], source="the served model")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from action3d.predict import answer_rows

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return pd.DataFrame(answer_rows(self.classifier, frame.to_dict("records"), params or {}))


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


def example_video(card: Mapping[str, Any]) -> bytes:
    """A short mp4 (two windows long, at the model's short side): the logged model's input example."""
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


def log_video_model(checkpoint: str | Path, card: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None) -> str:
    """Log `checkpoint` (a training stage's model.pt, with its card) as the video-in pyfunc of the active run;
    returns its models:/ URI. The input example (a generated video) is scored once while logging: a model that
    cannot serve fails here, not in production."""
    example = pd.DataFrame({"video_b64": [base64.b64encode(example_video(card)).decode()]})
    info = mlflow.pyfunc.log_model(
        name=NAME,
        python_model=VideoModel(),
        artifacts={CHECKPOINT: str(checkpoint)},
        signature=signature(),
        input_example=(example, {"topk": 5}),
        # serve with `--env-manager local` in the project's venv: action3d itself is not on an index
        pip_requirements=mlflow.pytorch.get_default_pip_requirements() + ["av"],
        metadata={"input": "videos: a 'video_b64' column (or 'video' paths the operator allows)",
                  "classes": list(card["classes"]), **(metadata or {})},
    )
    return info.model_uri


def download_checkpoint(model_uri: str, dst: str | Path) -> Path:
    """The checkpoint file (weights and card) of a logged or registered model, downloaded into `dst`."""
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    found = sorted((folder / "artifacts").glob("*"))
    if len(found) != 1:
        raise FileNotFoundError(f"{model_uri} holds no single checkpoint under artifacts/ (found {len(found)} files)")
    return found[0]


def load_module(model_uri: str):
    """The torch module of a logged or registered model, in eval mode, on the CPU: a plain nn.Module called on
    clips [B, 3, T, H, W] (any B, any T the architecture allows)."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().classifier.model.eval()
