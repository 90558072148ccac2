"""One video, two roads to the model: training's (the frame cache, the evaluation loader's windows) and serving's
(the logged pyfunc given the file's bytes as base64). Both decode and scale with the cache's `scaled_stream` and
put the frames through its JPEG, so the model sees the same pixels and gives the same logits: a served model is
scored on what it was trained on."""

from __future__ import annotations

import base64
import csv
import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from action3d.checkpoint import make_checkpoint, save_checkpoint
from action3d.predict import model_card
from action3d.config import load_params
from action3d.data.annotations import build_manifests, read_classes
from action3d.data.cache import build_cache
from action3d.data.loaders import make_eval_loader
from action3d.models import create_model
from action3d.predict import Classifier
from action3d.tracking.models import CHECKPOINT, VideoModel
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # real videos, encoded by the session fixture

KNOBS = ["clip.frames=8", "clip.crop_size=24", "cache.short_side=32", "cache.quality=75"]


@pytest.fixture(scope="module")
def trained(ucf_root, tmp_path_factory):
    """The test split's manifest and cache as the split and cache stages make them, and a model.pt with its card."""
    folder = tmp_path_factory.mktemp("decode")
    params = load_params(ROOT / "params.yaml", KNOBS)
    build_manifests("ucf101", ucf_root, folder / "splits", val_fraction=0.0, workers=1, progress=False)
    build_cache(folder / "splits", ucf_root, folder / "cache", short_side=params.cache.short_side,
                quality=params.cache.quality, min_frames=8, workers=1, progress=False)
    classes = read_classes(folder / "splits" / "classes.json")
    torch.manual_seed(0)
    model = create_model("resnet10", n_classes=len(classes), widen_factor=0.125, conv1_t_size=3).eval()
    path = folder / "model.pt"
    save_checkpoint(make_checkpoint(model, extra={"card": model_card(params, classes)}), path)
    return SimpleNamespace(folder=folder, params=params, model=model, checkpoint=path)


def training_road(trained) -> torch.Tensor:
    """Logits of every window of the one video of one.csv, through the cache and the evaluate stage's loader."""
    loader = make_eval_loader(trained.folder / "one.csv", trained.folder / "cache",
                              clip_frames=trained.params.clip.frames, crop_size=trained.params.clip.crop_size,
                              stride=trained.params.clip.stride, batch_size=4, workers=0)
    with torch.inference_mode():
        return torch.cat([trained.model(batch["video"]) for batch in loader])


def test_training_and_serving_give_one_video_the_same_logits(trained, ucf_root):
    rows = list(csv.DictReader(open(trained.folder / "splits" / "test.csv", newline="")))
    row = rows[0]
    with open(trained.folder / "one.csv", "w", newline="") as f:  # the manifest of that one video
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    trained_logits = training_road(trained)
    assert len(trained_logits) >= 2  # several windows: the windows line up, not only the first

    data = (ucf_root / row["path"]).read_bytes()
    classifier = Classifier.from_file(trained.checkpoint)
    served = torch.from_numpy(classifier.probabilities(io.BytesIO(data))[0])
    assert served.shape == trained_logits.shape
    torch.testing.assert_close(served, torch.softmax(trained_logits, dim=1), rtol=1e-4, atol=1e-5)

    # the logged model's own code (mlflow's pyfunc), as `mlflow models serve` calls it
    pyfunc = VideoModel()
    pyfunc.load_context(SimpleNamespace(artifacts={CHECKPOINT: str(trained.checkpoint)}))
    answer = pyfunc.predict(None, pd.DataFrame({"video_b64": [base64.b64encode(data).decode()]}), {"topk": 3})
    video = torch.softmax(trained_logits, dim=1).mean(0).numpy()
    order = np.argsort(-video)
    assert answer.loc[0, "error"] == ""
    assert answer.loc[0, "top_classes"] == [classifier.card.classes[i] for i in order]
    np.testing.assert_allclose(answer.loc[0, "top_probabilities"], video[order], atol=1e-4)


def test_without_the_cache_s_jpeg_the_pixels_differ(trained, ucf_root):
    """The control: the JPEG step is what makes the two roads meet (so the test above can fail)."""
    from action3d.predict import scaled_frames

    path = ucf_root / next(csv.DictReader(open(trained.folder / "splits" / "test.csv", newline="")))["path"]
    raw, _ = scaled_frames(path, trained.params.cache.short_side)
    cached, _ = scaled_frames(path, trained.params.cache.short_side, quality=trained.params.cache.quality)
    first_raw, first_cached = next(raw), next(cached)
    assert first_cached.shape == (3, *first_raw.shape[:2])
    difference = (torch.from_numpy(first_raw).permute(2, 0, 1).float() - first_cached.float()).abs().mean()
    assert difference > 0.5  # grey levels on average, at quality 75
