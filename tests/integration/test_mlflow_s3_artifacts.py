"""An MLflow server whose artifacts live on S3 (moto on loopback): a logged torch model lands in the bucket
and comes back through the server, for torch and for pyfunc prediction."""

import uuid

import mlflow
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture
def tracking(mlflow_s3_server, monkeypatch):
    """Point MLflow's fluent API at the server for one test, and leave it as it was afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3_server.tracking_uri)
    mlflow.set_tracking_uri(mlflow_s3_server.tracking_uri)
    yield mlflow_s3_server
    mlflow.set_tracking_uri(None)


def test_model_logged_to_s3_artifacts_loads_back_and_predicts(tracking, s3_server):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 4 * 4, 5)).eval()
    example = torch.randn(2, 3, 2, 4, 4)  # a batch of two clips [B, C, T, H, W]: keeps the batch size free
    name = f"tiny-{uuid.uuid4().hex[:8]}"

    mlflow.set_experiment(name)
    with mlflow.start_run() as run:
        # Explicit requirements skip MLflow's inference of them (a 15 s subprocess), which is not under test.
        info = mlflow.pytorch.log_model(model, name="model", input_example=example.numpy(),
                                        registered_model_name=name, pip_requirements=[f"torch=={torch.__version__}"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, stored by it on S3

    keys = [o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=tracking.bucket, Prefix=tracking.artifact_prefix + "/").get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys)

    clips = torch.randn(5, 3, 2, 4, 4)
    with torch.no_grad():
        expected = model(clips)
    restored = mlflow.pytorch.load_model(f"models:/{name}/1")
    with torch.no_grad():
        torch.testing.assert_close(restored(clips), expected)
    predicted = mlflow.pyfunc.load_model(info.model_uri).predict(clips.numpy())
    np.testing.assert_allclose(np.asarray(predicted), expected.numpy(), rtol=1e-5, atol=1e-6)
