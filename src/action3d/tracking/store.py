"""The MLflow store: a client on a tracking URI, and experiments whose artifacts stay with the project."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from action3d.errors import Action3dError
from action3d.project import shareable_uri, slug, sqlite_path

NOT_FOUND = (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), "NOT_FOUND", "INVALID_PARAMETER_VALUE")


class TrackingError(Action3dError):
    """The tracking store cannot be used as it is; the message names the store and the fix."""


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri)


def artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """For a sqlite store: `<db folder>/mlartifacts/<experiment>` (MLflow's own default is ./mlruns of the cwd).
    For a server the server decides (None)."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent.resolve() / "mlartifacts" / slug(experiment, keep="-_.")).as_uri()


def experiment_id(name: str, *, tracking_uri: str) -> str:
    """The id of experiment `name`, created if missing (artifacts beside a sqlite database).

    MLflow stores an experiment's artifact location as an absolute path: in a project that was moved or copied,
    the experiment would go on writing into the old folder. That is refused here, naming both folders."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(name)
    wanted = artifact_root(tracking_uri, name)
    if found is None:
        db = sqlite_path(tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        try:
            return mlflow_client.create_experiment(name, artifact_location=wanted)
        except MlflowException as err:  # another process created it meanwhile
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            found = mlflow_client.get_experiment_by_name(name)
    _check_artifact_location(found, tracking_uri)
    return found.experiment_id


def _check_artifact_location(experiment, tracking_uri: str) -> None:
    db = sqlite_path(tracking_uri)
    location = experiment.artifact_location or ""
    if db is None or not location.startswith("file:"):
        return
    folder = db.parent.resolve()
    stored = Path(location.removeprefix("file://"))
    if folder == stored or folder in stored.parents:
        return
    raise TrackingError(
        f"MLflow experiment {experiment.name!r} in {shareable_uri(tracking_uri)} keeps its artifacts in "
        f"{shareable_uri(location)}, outside the store's folder: the project was moved or copied after the experiment "
        "was made, and its runs would write into the old folder. Start a new experiment here (tracking.experiment "
        "in params.yaml, or -S tracking.experiment=NAME), or move the project back")


@contextlib.contextmanager
def quick_requests(timeout_s: float) -> Iterator[None]:
    """MLflow HTTP calls without retries and with a short timeout inside the block: a read that must not hang on a
    server that is down. The caller's own settings of these variables win."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s)))}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update({k: v for k, v in quick.items() if saved[k] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def store_exists(tracking_uri: str) -> bool:
    """False for a sqlite store whose file is not there (reading must not create it); True otherwise."""
    db = sqlite_path(tracking_uri)
    return db is None or db.is_file()
