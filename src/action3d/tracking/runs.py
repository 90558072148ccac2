"""A run per stage: params, lineage tags, per-epoch metrics, input datasets, artifacts and the stage's model.

    with start_stage_run("finetune", experiment="action3d", tracking_uri=uri, params=params.flat(),
                         params_hash=params.digest(), source_run_id=pretrain_run) as run:
        run.log_manifest(train_csv, context="train", digest=md5)
        fit(..., on_epoch_end=lambda epoch, m: run.log_epoch(m, step=epoch))
        run.log_model(checkpoint_path, card)

Lineage tags: "stage", "git_commit", "git_dirty", "params_hash", "source_run_id" (the run that made this stage's
input model: finetune -> pretrain, evaluate -> the model's training run) and "data_digest.<context>" (DVC's md5
of each input). Under torchrun only rank 0 opens a run.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from action3d.project import file_md5
from action3d.tracking.store import client, experiment_id

_BATCH = 100  # MLflow accepts at most 100 params (and 1000 metrics) per log_batch call
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting: the UI shows the run under its parent


def git_state(repo_dir: str | Path | None = None) -> dict[str, str]:
    """{"git_commit": HEAD's sha, "git_dirty": "true"/"false"} (tracked files only); "unknown" outside git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or "unknown", "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class StageRun:
    """The MLflow run of one stage; every method logs into it."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    @property
    def client(self):
        return client(self.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params (values as text). Re-logging a key with a new value fails."""
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i: i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i: i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numeric entries of `metrics` (arrays and other values are skipped: log those as artifacts)."""
        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step or 0) for key, value in _numbers(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i: i + 1000])

    def log_epoch(self, metrics: Mapping[str, Any], step: int) -> None:
        """Per-epoch metrics (`fit`'s history entry) at step = epoch; the "epoch" key itself is skipped."""
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_manifest(self, path: str | Path, *, context: str, digest: str | None = None) -> str:
        """Log a split manifest CSV as an input dataset of this run (`mlflow.log_input`) and tag the run
        `data_digest.<context>` with its digest (DVC's md5 of the file). Returns the digest."""
        import pandas as pd  # mlflow's own dependency; only needed here

        path = Path(path)
        digest = digest or file_md5(path)
        frame = pd.read_csv(path)
        self._ensure_active()
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways", "integer columns": harmless
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=str(path.resolve()), name=f"{path.parent.name}/{path.stem}",
                                              digest=digest, targets="label" if "label" in frame.columns else None)
            mlflow.log_input(dataset, context=context)
        self.set_tags({f"data_digest.{context}": digest})
        return digest

    def log_model(self, checkpoint: str | Path, card: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> str:
        """Log the stage's model, once: the checkpoint behind the served video model (`tracking.models`)."""
        from action3d.tracking.models import log_video_model

        self._ensure_active()
        return log_video_model(checkpoint, card, metadata=metadata)

    def _ensure_active(self) -> None:
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"run {self.run_id} is not the active MLflow run: log from inside start_stage_run")


@contextlib.contextmanager
def start_stage_run(
    stage: str,
    *,
    experiment: str,
    tracking_uri: str,
    params: Mapping[str, Any] | None = None,
    params_hash: str | None = None,
    source_run_id: str | None = None,
    parent_run_id: str | None = None,
    data_digests: Mapping[str, str] | None = None,
    tags: Mapping[str, Any] | None = None,
    repo_dir: str | Path | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run named `stage` in `experiment`, with `params` (flat) and the lineage tags (module doc).

    `parent_run_id` nests the run under another (a study's, a tuning study's). Every call starts a new run (a
    resumed stage links its run to the earlier one by tags). The run ends FINISHED, or FAILED when the block raises.
    """
    mlflow.set_tracking_uri(tracking_uri)  # the fluent API (log_input, log_model) follows the global URI
    start = dict(experiment_id=experiment_id(experiment, tracking_uri=tracking_uri), run_name=stage)
    with mlflow.start_run(**start) as active:
        run = StageRun(active.info.run_id, active.info.experiment_id, tracking_uri)
        run.set_tags({"stage": stage, **git_state(repo_dir), "params_hash": params_hash, "source_run_id": source_run_id,
                      PARENT_TAG: parent_run_id, **{f"data_digest.{k}": v for k, v in (data_digests or {}).items()},
                      **(tags or {})})
        if params:
            run.log_params(params)
        yield run


def known_run(run_id: str, *, tracking_uri: str) -> bool:
    """Whether `run_id` is a run of the store at `tracking_uri` (a resumed stage links its new run to it)."""
    try:
        client(tracking_uri).get_run(run_id)
    except MlflowException:  # unknown here (another store, a deleted run)
        return False
    return True


def tag_run(run_id: str, tags: Mapping[str, Any], *, tracking_uri: str, status: str | None = None) -> None:
    """Set tags on a finished run, and optionally its final status (FINISHED, FAILED, KILLED)."""
    mlflow_client = client(tracking_uri)
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, str(value))
    if status:
        mlflow_client.set_terminated(run_id, status)


def create_parent_run(name: str, *, experiment: str, tracking_uri: str, tags: Mapping[str, Any] | None = None,
                      params: Mapping[str, Any] | None = None, repo_dir: str | Path | None = None) -> StageRun:
    """A run that other runs nest under (an architecture study, a tuning study), made before them and left open:
    `finish_run` ends it. Made with the client, not the fluent API, so a stage may open its own run meanwhile."""
    made = client(tracking_uri).create_run(experiment_id(experiment, tracking_uri=tracking_uri), run_name=name,
                                           tags={**git_state(repo_dir), **{k: str(v) for k, v in (tags or {}).items()}})
    run = StageRun(made.info.run_id, made.info.experiment_id, tracking_uri)
    if params:
        run.log_params(params)
    return run


def finish_run(run: StageRun, *, failed: bool = False) -> None:
    run.client.set_terminated(run.run_id, "FAILED" if failed else "FINISHED")


def log_study_table(run: StageRun, rows: list[Mapping[str, Any]], files: list[str | Path] = ()) -> None:
    """An architecture study's table on its run: each row's numbers as metrics `<entry>.<key>`, the rows as an
    MLflow table (study.json) and `files` (the CSV, the plot) as artifacts."""
    run.set_tags({"entries": ",".join(str(r["entry"]) for r in rows),
                  "failed": ",".join(str(r["entry"]) for r in rows if r.get("status") != "ok")})
    run.log_metrics({f"{row['entry']}.{key}": value for row in rows for key, value in _numbers(row).items()})
    columns = sorted({key for row in rows for key in row})
    run.client.log_table(run.run_id, {key: [row.get(key) for row in rows] for key in columns}, artifact_file="study.json")
    for path in files:
        run.log_artifact(path)
