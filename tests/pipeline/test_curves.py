"""A training stage draws its curves as a PNG (a DVC plot that renders offline) and logs it to MLflow."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from action3d.stages import pretrain

pytestmark = pytest.mark.slow


def test_a_training_stage_writes_and_logs_its_curves_png(workdir, tiny_params):
    from mlflow import MlflowClient

    from action3d.stages.common import tracking_uri

    out = workdir / "runs/pretrain"
    pretrain.run(tiny_params, manifests_dir=workdir / "data/splits/pretrain",
                 cache_dir=workdir / "data/cache/pretrain", out_dir=out)
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300, image.size
        low, high = image.convert("L").getextrema()
    assert low < high, "a blank image"
    assert not list(out.glob(".curves.png.tmp*"))
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    logged = [a.path for a in MlflowClient(tracking_uri()).list_artifacts(run_id, "plots")]
    assert logged == ["plots/curves.png"]
