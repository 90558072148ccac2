"""Reading runs back for the report: which runs an experiment, a study or a tuning study holds, their metric
histories, the evaluation made of each model and its files. Plain records out, so the report needs no mlflow."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mlflow.exceptions import MlflowException

from action3d.errors import Action3dError
from action3d.project import shareable_uri
from action3d.tracking.runs import PARENT_TAG
from action3d.tracking.store import client


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    minutes: float | None  # wall time, None while it runs

    @property
    def stage(self) -> str:
        return self.tags.get("stage", "?")


def _record(run) -> RunRecord:
    info = run.info
    minutes = (info.end_time - info.start_time) / 60000 if info.end_time else None
    return RunRecord(info.run_id, dict(run.data.tags), dict(run.data.params), dict(run.data.metrics), minutes)


def _quoted(value: str) -> str:
    """`value` as a quoted literal of an MLflow filter string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Experiment:
    """One experiment of a store, read only."""

    def __init__(self, tracking_uri: str, name: str):
        self.uri, self.name, self.client = tracking_uri, name, client(tracking_uri)
        try:
            found = self.client.get_experiment_by_name(name)
        except MlflowException as err:
            raise Action3dError(f"cannot read the tracking store {shareable_uri(tracking_uri)} "
                                f"({str(err).splitlines()[0]}): start the server or set MLFLOW_TRACKING_URI to a store "
                                "that answers") from None
        if found is None:
            raise Action3dError(f"no MLflow experiment {name!r} in {shareable_uri(tracking_uri)}: run the pipeline "
                                "first (`make run`), or name one with --experiment")
        self.id = found.experiment_id

    def runs(self, query: str) -> Iterator[RunRecord]:
        """Every run matching `query`, newest first, page by page (a study or a long history holds many)."""
        token = None
        while True:
            page = self.client.search_runs([self.id], query, max_results=500, order_by=["attribute.start_time DESC"],
                                           page_token=token)
            yield from (_record(run) for run in page)
            token = page.token
            if not token:
                return

    def scope(self, stages: tuple[str, ...], *, study: str | None = None, tune: str | None = None
              ) -> tuple[str, list[RunRecord]]:
        """(title, training runs) of what a report covers: the latest pipeline (the newest finished run of each of
        `stages` not nested under a study or tuning run), an architecture study's entries, or a tuning study's
        trials (each trial's newest run, whichever `action3d tune` call ran it)."""
        if tune:
            trials: dict[str, RunRecord] = {}
            for run in self.runs(f"tags.study = {_quoted(tune)}"):
                number = run.tags.get("trial")
                if number is not None and run.stage in stages:
                    trials.setdefault(number, run)
            if not trials:
                raise Action3dError(f"no trials of tuning study {tune!r} in experiment {self.name!r}: run "
                                    "`action3d tune` first, or check --experiment")
            return f"tuning study {tune}", [trials[k] for k in sorted(trials, key=int)]
        if study:
            parent = next(self.runs(f"tags.stage = 'study' AND tags.study = {_quoted(study)}"), None)
            if parent is None:
                names = sorted({r.tags.get("study", "?") for r in self.runs("tags.stage = 'study'")})
                raise Action3dError(f"no architecture study {study!r} in experiment {self.name!r} (studies: "
                                    f"{', '.join(names) or 'none'}): run it first (`make study`), or check --experiment")
            children = self.runs(f"tags.`{PARENT_TAG}` = '{parent.run_id}'")
            return f"study {study}", [r for r in children if r.stage in stages]
        latest = []
        for stage in stages:
            runs = self.runs(f"tags.stage = '{stage}' AND attributes.status = 'FINISHED'")
            latest.append(next((r for r in runs if PARENT_TAG not in r.tags), None))
        return "the latest pipeline", [r for r in latest if r is not None]

    def history(self, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
        """One row per epoch ({"epoch": n, key: value, ...}) of the metrics `keys` a run logged per step."""
        rows: dict[int, dict[str, float]] = {}
        for key in keys:
            for point in self.client.get_metric_history(run_id, key):
                rows.setdefault(point.step, {"epoch": point.step})[key] = point.value
        return [rows[k] for k in sorted(rows)]

    def evaluation(self, run_id: str) -> RunRecord | None:
        """The newest evaluate run of the model that training run `run_id` made."""
        return next(self.runs(f"tags.stage = 'evaluate' AND tags.source_run_id = '{run_id}'"), None)

    def fetch(self, run_id: str, path: str, dst: Path) -> Path | None:
        """An artifact of a run downloaded into the folder `dst`; None when the run has no such file."""
        dst.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files: no bar per image
        with contextlib.suppress(MlflowException, OSError):
            return Path(self.client.download_artifacts(run_id, path, str(dst)))
        return None
