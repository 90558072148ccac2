"""MLflow, and the only module that imports it: runs, lineage tags, datasets, logged models, registry promotion.

Tracking goes to MLFLOW_TRACKING_URI when it is set, else to a local sqlite file that the caller names
(`resolve_tracking_uri(project_dir / "mlflow.db")`); with a sqlite store, artifacts go to `mlartifacts/` beside the
database file. Nothing happens at import.

A stage does:

    uri = resolve_tracking_uri(root / "mlflow.db")
    with start_stage_run("finetune", experiment="action3d", tracking_uri=uri, params=params.model_dump(),
                         params_hash=params.digest(), parent_run_id=pretrain_run) as run:
        run.log_manifest(train_csv, context="train", digest=md5_from_dvc_lock)
        fit(..., on_epoch_end=lambda epoch, m: run.log_epoch(m, step=epoch))
        run.log_model(model, input_example=batch["video"][:2])
    register_model(run.run_id, "action3d-demo", metrics=test_metrics, data_digest=test_md5,
                   metric_key="video_top1", tracking_uri=uri)

Under torchrun only rank 0 should open a run (`action3d.distributed.is_main_process()`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from action3d.checkpoint import unwrap_model
from action3d.errors import Action3dError
from action3d.storage import file_md5

CHAMPION = "champion"
CHALLENGER = "challenger"
_BATCH = 100  # MLflow accepts at most 100 params (and 1000 metrics) per log_batch call


# --- where runs go ---------------------------------------------------------------------------------------------


def resolve_tracking_uri(default_db: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else `sqlite:///<absolute default_db>`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(default_db).resolve()}"


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI, None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :])


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a sqlite store: `<db folder>/mlartifacts/<experiment>` (MLflow's own default is ./mlruns of the cwd).
    For a server the server decides (None)."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (db.parent.resolve() / "mlartifacts" / slug).as_uri()


def get_or_create_experiment(name: str, *, tracking_uri: str) -> str:
    """The id of experiment `name`, created if missing (artifacts beside a sqlite database)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name))
    except MlflowException as err:  # another process created it meanwhile
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


# --- lineage ---------------------------------------------------------------------------------------------------


def git_state(repo_dir: str | Path | None = None) -> dict[str, str]:
    """{"git_commit": HEAD's sha, "git_dirty": "true"/"false"} (tracked files only); "unknown" outside git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings to dotted keys with string values: {"train": {"lr": 0.1}} -> {"train.lr": "0.1"}.
    An empty mapping stays one param ("{}") so that it is visible."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{dotted}."))
        else:
            flat[dotted] = str(value)
    return flat


# --- a run per stage -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRun:
    """The MLflow run of one stage; every method logs into it."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings are flattened to dotted keys). Re-logging a key with a new value fails."""
        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the scalar entries of `metrics` (numpy arrays and other non-scalars are skipped: log those as
        artifacts). Non-finite values are logged as they are (MLflow stores NaN)."""
        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step or 0)
            for key, value in metrics.items()
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_epoch(self, metrics: Mapping[str, Any], step: int) -> None:
        """Per-epoch metrics (e.g. `fit`'s history entry) at step = epoch; the "epoch" key itself is skipped."""
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_manifest(
        self, path: str | Path, *, context: str, name: str | None = None, digest: str | None = None
    ) -> str:
        """Log a split manifest CSV as an input dataset of this run (`mlflow.log_input`), and tag the run
        `data_digest.<context>` with its digest. `digest` is the DVC md5 of the file (computed from the bytes
        when not given, which is the same thing). Returns the digest."""
        import pandas as pd  # mlflow's own dependency; only needed here

        path = Path(path)
        digest = digest or file_md5(path)
        frame = pd.read_csv(path)
        self._ensure_active()
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways", "integer columns": harmless
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                frame,
                source=str(path.resolve()),
                name=name or f"{path.parent.name}/{path.stem}",
                digest=digest,
                targets="label" if "label" in frame.columns else None,
            )
            mlflow.log_input(dataset, context=context)
        self.set_tags({f"data_digest.{context}": digest})
        return digest

    def log_model(
        self,
        model: torch.nn.Module,
        input_example: torch.Tensor | np.ndarray,
        *,
        name: str = "model",
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Log `model` as a plain (pickled) PyTorch model and return its `models:/<model_id>` URI.

        It loads back as an ordinary nn.Module (`mlflow.pytorch.load_model`: `.eval()`, any batch size, any clip
        length T the architecture allows). Its pyfunc (`mlflow.pyfunc.load_model(uri).predict(x)`) is this
        module's `_ClipPredictor`: x is [B, 3, T, H, W] clips as float32/float64 numpy or a torch tensor, the
        result the [B, num_classes] logits as float32 numpy. MLflow's own tensor signature would refuse float64
        and torch tensors (and print the whole tensor when a shape is wrong), so no signature is stored: the
        clip shape the model was trained on, from `input_example`, is in the model's metadata instead.
        The model is copied to the CPU in float32, contiguous, eval mode; the caller's model is left untouched.
        """
        example = torch.as_tensor(input_example).detach().float().cpu()
        if example.ndim != 5:
            raise ValueError(f"input_example must be clips [B, 3, T, H, W], got shape {tuple(example.shape)}")
        net = copy.deepcopy(unwrap_model(model)).cpu().float().eval().to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            output = net(example[:1].contiguous())
        meta = {"input": "float32 [B, 3, T, H, W]", "trained_clip": list(example.shape[1:]),
                "num_classes": int(output.shape[-1]), **(metadata or {})}
        self._ensure_active()
        info = mlflow.models.Model.log(
            name=name,
            artifact_path=None,
            flavor=_ClipFlavor,
            pytorch_model=net,
            serialization_format="pickle",  # a normal nn.Module; pt2 (torch.export) would fix T and lack .eval()
            metadata=meta,
            # pinned from the running versions; MLflow's inference would re-import the model in a subprocess (~10 s)
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        )
        return info.model_uri

    def _ensure_active(self) -> None:
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"run {self.run_id} is not the active MLflow run: log from inside start_stage_run")


class _ClipFlavor:
    """mlflow.pytorch's flavor whose pyfunc is `_ClipPredictor` (for `mlflow.models.Model.log`)."""

    __name__ = "pytorch"

    @staticmethod
    def save_model(path, mlflow_model, **kwargs) -> None:
        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.flavors["python_function"]["loader_module"] = _load_pyfunc.__module__
        mlflow_model.save(os.path.join(path, "MLmodel"))


class _ClipPredictor:
    """The pyfunc of a logged model: [B, 3, T, H, W] clips (float32/float64 numpy or torch) -> logits (numpy)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def get_raw_model(self) -> torch.nn.Module:
        return self.model

    def predict(self, data, params: Mapping[str, Any] | None = None) -> np.ndarray:
        if not isinstance(data, (torch.Tensor, np.ndarray)):
            raise TypeError(f"predict takes clips as a numpy array or a torch tensor, got {type(data).__name__}")
        x = torch.as_tensor(data).detach().to("cpu", torch.float32)
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"predict takes clips of shape [B, 3, T, H, W], got {tuple(x.shape)}")
        with torch.no_grad():
            return self.model(x).float().numpy()


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> _ClipPredictor:
    """Called by mlflow.pyfunc.load_model for models logged by `StageRun.log_model` (always on the CPU); `path` is
    the model's `data` folder (the pyfunc conf's `data`), the MLmodel file is one level up."""
    root = Path(path) if (Path(path) / "MLmodel").is_file() else Path(path).parent
    return _ClipPredictor(mlflow.pytorch.load_model(str(root), map_location="cpu").eval())


def known_run(run_id: str, *, tracking_uri: str) -> bool:
    """Whether `run_id` is a run of the store at `tracking_uri` (a resumed stage links its new run to it)."""
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:  # unknown here (another store, a deleted run)
        return False
    return True


def tag_run(run_id: str, tags: Mapping[str, Any], *, tracking_uri: str, status: str | None = None) -> None:
    """Set tags on a finished run, and optionally its final status (FINISHED, FAILED, KILLED)."""
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    if status:
        client.set_terminated(run_id, status)


@contextlib.contextmanager
def start_stage_run(
    stage: str,
    *,
    experiment: str,
    tracking_uri: str,
    params: Mapping[str, Any] | None = None,
    params_hash: str | None = None,
    parent_run_id: str | None = None,
    data_digests: Mapping[str, str] | None = None,
    tags: Mapping[str, Any] | None = None,
    repo_dir: str | Path | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run named `stage` in `experiment`, log `params` flattened and the lineage tags.

    Tags: "stage", "git_commit", "git_dirty" (of `repo_dir`, default the cwd), "params_hash", "parent_run_id"
    (the run that produced this stage's input checkpoint), "data_digest.<name>" for each of `data_digests`, and
    any `tags`. Every call starts a new run (a resumed stage links its run to the earlier one by tags). The run
    ends FINISHED, or FAILED when the block raises. Opened inside another active run (an Optuna study), it
    becomes a nested child run of it.
    """
    mlflow.set_tracking_uri(tracking_uri)  # the fluent API (log_input, log_model) follows the global URI
    # a study running this stage in another process (flows/study.py) tags it and nests it under the study's run
    inherited = json.loads(os.environ.get("ACTION3D_RUN_TAGS") or "{}")
    start = dict(
        experiment_id=get_or_create_experiment(experiment, tracking_uri=tracking_uri),
        run_name=stage,
        nested=mlflow.active_run() is not None,
    )
    with mlflow.start_run(**start) as active:
        run = StageRun(active.info.run_id, active.info.experiment_id, tracking_uri)
        run.set_tags(
            {
                "stage": stage,
                **git_state(repo_dir),
                "params_hash": params_hash,
                "parent_run_id": parent_run_id,
                **{f"data_digest.{k}": v for k, v in (data_digests or {}).items()},
                **inherited,
                **(tags or {}),
            }
        )
        if params:
            run.log_params(params)
        yield run


def create_study_run(study: str, *, experiment: str, tracking_uri: str, repo_dir: str | Path | None = None) -> str:
    """An MLflow run for a study (the architecture study), made before its entries run so that their runs nest
    under it (`ACTION3D_RUN_TAGS` carries its id to them); `log_study` fills it in and ends it."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(get_or_create_experiment(experiment, tracking_uri=tracking_uri), run_name=f"study-{study}",
                            tags={"stage": "study", "study": study, **git_state(repo_dir)})
    return run.info.run_id


def log_study(run_id: str, rows: list[Mapping[str, Any]], *, tracking_uri: str, files: list[str | Path] = ()) -> None:
    """The study's table on its run: each row's numbers as metrics `<entry>.<key>`, the rows as an MLflow table,
    `files` (the CSV, the plot) as artifacts; the run ends FINISHED."""
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id) as active:
        run = StageRun(active.info.run_id, active.info.experiment_id, tracking_uri)
        run.set_tags({"entries": ",".join(str(r["entry"]) for r in rows),
                      "failed": ",".join(str(r["entry"]) for r in rows if r.get("status") != "ok")})
        run.log_metrics({f"{row['entry']}.{key}": value for row in rows for key, value in row.items()
                         if isinstance(value, (int, float)) and not isinstance(value, bool)})
        columns = sorted({key for row in rows for key in row})
        mlflow.log_table({key: [row.get(key) for row in rows] for key in columns}, artifact_file="study.json")
        for path in files:
            run.log_artifact(path)


# --- registry --------------------------------------------------------------------------------------------------
#
# Who is champion is a function of the registry's contents, not of the order registrations ran in: the champion is
# the best version scored on the current test split (best `metric_key`, ties to the older version). A version's
# score on split D is its own test metric when it was measured on D (tags `data_digest`, `metric.<key>`), else a
# re-score on D (tag `rescore.<D>.<key>`, written when it was champion and the split changed). MLflow has no
# transactions, so a registration creates its version, then points `champion` at the winner and re-reads until a
# read agrees: the last alias write is followed by a read of its writer that saw every version created before it,
# and every later version's writer reads after creating it, so concurrent registrations end on the same champion.

RESCORE_ARTIFACT = "checkpoint/model.pt"  # the checkpoint stages/training.py logs beside the model
_SETTLE_ROUNDS = 20

Rescore = Callable[[Path], Mapping[str, Any]]  # a checkpoint file -> its test metrics on the current split


@dataclass(frozen=True)
class Registration:
    """What `register_model` did: the version of `name` for the run, its alias, and why."""

    name: str
    version: str
    alias: str | None  # "champion", "challenger", or None (an older version that lost its alias since)
    created: bool  # False when the run was already registered (nothing changed)
    reason: str
    # the version this one was compared with on the current split: {"version", "score", "rescored"}; None when alone
    compared: dict[str, Any] | None = None


def _find_logged_model(client: MlflowClient, run_id: str, artifact: str) -> str:
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{artifact}'"
    )
    if not models:
        raise LookupError(
            f"run {run_id} has no logged model named '{artifact}': it was trained before the stages logged it. "
            "Re-run its training stage (`dvc repro -f finetune`), or register a newer run"
        )
    return max(models, key=lambda m: m.creation_timestamp).model_id  # the latest if it was logged twice


def _aliases_of(client: MlflowClient, name: str, version: str) -> list[str]:
    return list(client.get_model_version(name, version).aliases)


def _alias_of(client: MlflowClient, name: str, version: str) -> str | None:
    aliases = _aliases_of(client, name, version)
    return CHAMPION if CHAMPION in aliases else CHALLENGER if CHALLENGER in aliases else None


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _versions(client: MlflowClient, name: str) -> list:
    """Every version of `name` (all pages), oldest first."""
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def _rescore_tag(digest: str, key: str) -> str:
    return f"rescore.{digest}.{key}"


def _score_on(version, digest: str, key: str) -> tuple[float, bool] | None:
    """(score, re-scored?) of `version` for `key` on test split `digest`; None when unknown or NaN there."""
    raw, rescored = None, False
    if version.tags.get("data_digest") == digest:
        raw = version.tags.get(f"metric.{key}")
    if raw is None:
        raw, rescored = version.tags.get(_rescore_tag(digest, key)), True
    if raw is None or math.isnan(float(raw)):
        return None
    return float(raw), rescored


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def _ranked(versions: list, digest: str, key: str, higher_is_better: bool, skip: str | None = None):
    """The best of `versions` scored on `digest` as (version, score, rescored), ties to the older; None if none.
    A second version of a run already registered (two registrations of one run at once) does not count."""
    best, runs = None, set()
    for version in versions:  # oldest first: a later version must be strictly better to take over
        if version.run_id and version.run_id in runs:
            continue
        runs.add(version.run_id)
        scored = _score_on(version, digest, key)
        if scored is None or str(version.version) == skip:
            continue
        if best is None or _better(scored[0], best[1], higher_is_better):
            best = (version, *scored)
    return best


def _retried(write: Callable[[], Any], attempts: int = 5) -> None:
    """A registry write that may be repeated. The sqlite store sets an alias or a tag by reading, then inserting:
    two writers at once break a UNIQUE constraint and one gets an MlflowException, which a retry does not."""
    for attempt in range(attempts):
        try:
            write()
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _settle_champion(client: MlflowClient, name: str, digest: str, key: str, higher_is_better: bool):
    """Point `champion` at the best version scored on `digest`, and re-read until a read agrees (see above).
    Returns (the versions read last, the winner as _ranked gives it or None)."""
    for _ in range(_SETTLE_ROUNDS):
        versions = _versions(client, name)
        best = _ranked(versions, digest, key, higher_is_better)
        if best is None:
            return versions, None
        current = _champion(client, name)
        if current is not None and str(current.version) == str(best[0].version):
            return versions, best
        _retried(lambda: client.set_registered_model_alias(name, CHAMPION, best[0].version))
    raise RuntimeError(f"the {CHAMPION} alias of {name} kept moving over {_SETTLE_ROUNDS} rounds: is something "
                       f"else setting it?")


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _settle_challenger(client: MlflowClient, name: str, digest: str, key: str, higher_is_better: bool, mine: str):
    """Point `challenger` at the best version scored on `digest` that is not the best of all (the champion), and
    re-read until a read agrees, as `_settle_champion` does. Returns that runner-up as _ranked gives it, or None
    when no other version is scored there (a NaN score): then `mine` takes `challenger` when it holds none scored
    on `digest` (one write: two such versions at once need no agreement on which of them it is)."""
    for _ in range(_SETTLE_ROUNDS):
        versions = _versions(client, name)
        best = _ranked(versions, digest, key, higher_is_better)
        runner = _ranked(versions, digest, key, higher_is_better, skip=None if best is None else str(best[0].version))
        current = _alias_version(client, name, CHALLENGER)
        if runner is None:
            held = next((v for v in versions if str(v.version) == current), None)
            if held is None or _score_on(held, digest, key) is None:
                _retried(lambda: client.set_registered_model_alias(name, CHALLENGER, mine))
            return None
        if current == str(runner[0].version):
            return runner
        _retried(lambda: client.set_registered_model_alias(name, CHALLENGER, runner[0].version))
    raise RuntimeError(f"the {CHALLENGER} alias of {name} kept moving over {_SETTLE_ROUNDS} rounds: is something "
                       f"else setting it?")


def _rescore(client: MlflowClient, name: str, version, digest: str, key: str, rescore: Rescore) -> None:
    """Score `version`'s training checkpoint on the current split with `rescore`; tag the version with it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="action3d-rescore-") as tmp:
        try:
            path = client.download_artifacts(version.run_id, RESCORE_ARTIFACT, tmp)
        except (MlflowException, OSError) as err:
            raise LookupError(
                f"{CHAMPION} v{version.version} of {name} was not measured on test split {digest} and its run "
                f"{version.run_id} has no {RESCORE_ARTIFACT} to re-score it with ({err}); move the alias by hand "
                f"(MlflowClient().set_registered_model_alias) or register it again from a training run"
            ) from err
        metrics = rescore(Path(path))
    if key not in metrics:
        raise KeyError(f"re-scoring {name} v{version.version} gave no '{key}' (got {sorted(metrics)})")
    for metric, value in metrics.items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            tag = (_rescore_tag(digest, metric), str(float(value)))
            _retried(lambda: client.set_model_version_tag(name, version.version, *tag))


def register_model(
    run_id: str,
    name: str,
    *,
    metrics: Mapping[str, float],
    data_digest: str,
    metric_key: str,
    tracking_uri: str,
    artifact: str = "model",
    higher_is_better: bool = True,
    rescore: Rescore | None = None,
) -> Registration:
    """Make the model logged by `run_id` a new version of registered model `name`, and give it an alias.

    The version is tagged `metric.<key>` for each of `metrics` (the test metrics), `data_digest` (the test
    split's DVC md5) and `metric_key`. `champion` then goes to the best version scored on this split (strictly
    better `metric_key` per `higher_is_better`, ties keep the older version). When the new version is not that,
    `challenger` goes to the best of the other versions scored on this split: the new version when it beats the
    current challenger there (or that one was measured on other data), else the challenger stays and the new
    version holds no alias (Registration.alias None). Its tags `promotion` (why), `compared.version`, `compared.<metric_key>` and
    `compared.rescored` record what it was compared with.

    When the champion was measured on another test split (or lacks `metric_key`), `rescore` scores its training
    run's `checkpoint/model.pt` on this split first, and the champion version is tagged `rescore.<digest>.<metric>`
    with the result. Without `rescore` such a champion is not comparable and the versions scored on this split
    take over (the reason says so).

    Registering a run that already has a version of `name` creates nothing and changes no alias (idempotent).
    Concurrent registrations (processes, machines) converge on one champion, the best (see the section's notes).
    """
    if "'" in name or "'" in run_id:
        raise ValueError(f"registered model name and run id may not contain quotes: {name!r}, {run_id!r}")
    if metric_key not in metrics:
        raise KeyError(f"metric_key '{metric_key}' is not among the metrics {sorted(metrics)}")
    # The sqlite registry resolves a version's `models:/<id>` source through the *global* tracking URI, which
    # defaults to ./mlflow.db: in another working directory (a `dvc exp` queue copy) it would look in the wrong store.
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)

    def already(version) -> Registration:
        reason = f"run {run_id} is already version {version.version}"
        return Registration(name, str(version.version), _alias_of(client, name, version.version), False, reason)

    existing = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if existing:
        return already(min(existing, key=lambda v: int(v.version)))

    model_id = _find_logged_model(client, run_id, artifact)
    with contextlib.suppress(MlflowException):  # exists already: fine
        client.create_registered_model(name)
    previous = _champion(client, name)
    if previous is not None and rescore is not None and _score_on(previous, data_digest, metric_key) is None:
        _rescore(client, name, previous, data_digest, metric_key, rescore)

    tags = {f"metric.{k}": str(float(v)) for k, v in metrics.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
    tags.update(data_digest=data_digest, metric_key=metric_key)
    created = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
    )
    mine = str(created.version)
    twins = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    first = min(twins, key=lambda v: int(v.version))
    if str(first.version) != mine:  # the same run registered at the same time elsewhere: the older version stands
        client.delete_model_version(name, mine)
        return already(first)

    versions, best = _settle_champion(client, name, data_digest, metric_key, higher_is_better)
    if best is None and _champion(client, name) is None:  # a NaN score, and nothing else to crown
        _retried(lambda: client.set_registered_model_alias(name, CHAMPION, mine))
    won = str(best[0].version) == mine if best is not None else _champion_version(client, name) == mine
    alias, runner = CHAMPION, None
    if not won:  # challenger: the best version on this split that is not the champion (mine or an earlier one)
        runner = _settle_challenger(client, name, data_digest, metric_key, higher_is_better, mine)
        alias = CHALLENGER if runner is None or str(runner[0].version) == mine else None

    score = float(metrics[metric_key])
    other = _ranked(versions, data_digest, metric_key, higher_is_better, skip=mine) if won else best
    compared = None if other is None else {"version": str(other[0].version), "score": other[1], "rescored": other[2]}
    reason = _reason(metric_key, score, data_digest, won, other, previous)
    if alias is None:
        reason += (f", nor challenger v{runner[0].version}'s {runner[1]:.6g}: it keeps no alias "
                   f"(models:/{name}/{mine} still loads it)")
    version_tags = {"promotion": reason}
    if compared is not None:
        version_tags.update({"compared.version": compared["version"], f"compared.{metric_key}": str(compared["score"]),
                             "compared.rescored": str(compared["rescored"]).lower()})
    for key, value in version_tags.items():
        _retried(lambda: client.set_model_version_tag(name, mine, key, value))
    return Registration(name, mine, alias, True, reason, compared)


def _champion_version(client: MlflowClient, name: str) -> str | None:
    champion = _champion(client, name)
    return None if champion is None else str(champion.version)


def _reason(key: str, score: float, digest: str, won: bool, other, previous) -> str:
    """Why the new version got its alias, in words (the `promotion` tag)."""
    if other is None:
        if not won:
            return f"{key} {score:.6g} is not a number: it beats nothing"
        if previous is None:
            return "first version with an alias: champion"
        return (f"champion v{previous.version} was measured on test split {previous.tags.get('data_digest')}, "
                f"this version on {digest}, and it was not re-scored: not comparable, the version measured on the "
                f"current split takes over")
    version, best, rescored = other
    how = (f" (v{version.version} re-scored on this split; it measured {version.tags.get(f'metric.{key}', '?')} on "
           f"test split {version.tags.get('data_digest')})") if rescored else ""
    if won:
        return f"{key} {score:.6g} beats v{version.version}'s {best:.6g} on test split {digest}{how}"
    return f"{key} {score:.6g} does not beat champion v{version.version}'s {best:.6g} on test split {digest}{how}"


@dataclass(frozen=True)
class AliasedVersion:
    """A version of a registered model as the registry holds it now (`read_aliases`)."""

    version: str
    run_id: str | None
    metric_key: str | None
    score: float | None  # its test `metric_key` (the tag `metric.<key>`), None when it has none
    data_digest: str | None  # the test data it was measured on


def read_aliases(name: str, *, tracking_uri: str, timeout_s: float = 10) -> dict[str, AliasedVersion]:
    """The versions that `champion` and `challenger` of `name` point at now, by alias ({} when `name` is not
    registered or has no alias). Reads only: a sqlite store that does not exist raises FileNotFoundError instead of
    being created; a server that does not answer within about `timeout_s` raises (MlflowException or OSError)."""
    db = _sqlite_path(tracking_uri)
    if db is not None and not Path(str(db).split("?")[0]).is_file():
        raise FileNotFoundError(f"no tracking database at {db}")
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s)))}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update({k: v for k, v in quick.items() if saved[k] is None})  # the caller's own settings win
    try:
        client = MlflowClient(tracking_uri)
        try:
            model = client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), "NOT_FOUND"):
                return {}
            raise
        found = {}
        for alias in (CHAMPION, CHALLENGER):
            version = (model.aliases or {}).get(alias)
            if version is None:
                continue
            held = client.get_model_version(name, str(version))
            key = held.tags.get("metric_key")
            raw = held.tags.get(f"metric.{key}") if key else None
            found[alias] = AliasedVersion(str(version), held.run_id, key, None if raw is None else float(raw),
                                          held.tags.get("data_digest"))
        return found
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def champion_uri(name: str) -> str:
    """`models:/<name>@champion`, for mlflow.pyfunc / mlflow.pytorch loaders or `load_registered_model`."""
    return f"models:/{name}@{CHAMPION}"


def load_registered_model(name: str, *, alias: str = CHAMPION, tracking_uri: str) -> torch.nn.Module:
    """The torch module of `models:/<name>@<alias>`, in eval mode: a normal nn.Module, called on [B, 3, T, H, W]
    (any B, any T the architecture allows)."""
    from action3d.serving import load_module  # a registered video model holds the module behind its pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    return load_module(f"models:/{name}@{alias}").eval()


# --- using the registry: resolve, browse, steer -------------------------------------------------------------------

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryError(Action3dError):
    """A registered model, version or alias that does not exist: the message lists what does."""


def resolve_version(uri: str, *, tracking_uri: str):
    """The ModelVersion of `models:/<name>@<alias>` or `models:/<name>/<version>`; a RegistryError listing the
    versions and aliases that exist when it is not there."""
    found = _MODEL_URI.match(uri)
    if not found:
        raise RegistryError(f"{uri!r} is not a registered model URI: write models:/<name>@<alias> (e.g. "
                            "models:/action3d-demo@champion) or models:/<name>/<version>")
    client = MlflowClient(tracking_uri)
    name, alias, version = found["name"], found["alias"], found["version"]
    versions = _versions_or_error(client, name, tracking_uri)
    numbers = ", ".join(str(v.version) for v in versions)
    if alias:
        aliases = _alias_map(client, name)  # searches of versions do not fill in their aliases
        if alias not in aliases:
            shown = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"{name} has no alias {alias!r}; its aliases: {shown} (versions {numbers})")
        version = aliases[alias]
    match = [v for v in versions if str(v.version) == str(version)]
    if not match:
        raise RegistryError(f"{name} has no version {version}; its versions: {numbers}")
    return client.get_model_version(name, str(match[0].version))


def _alias_map(client: MlflowClient, name: str) -> dict[str, str]:
    """alias -> version number (as text) of registered model `name`."""
    return {alias: str(number) for alias, number in (client.get_registered_model(name).aliases or {}).items()}


def _versions_or_error(client: MlflowClient, name: str, tracking_uri: str) -> list:
    versions = _versions(client, name)
    if not versions:
        names = sorted(m.name for m in client.search_registered_models())
        from action3d.stages.common import shareable_uri  # printed: no password, no machine path

        raise RegistryError(f"no registered model {name!r} in {shareable_uri(tracking_uri)}; registered: "
                            f"{', '.join(names) or 'none (run the pipeline: `dvc repro`)'}")
    return versions


def download_version_checkpoint(uri: str, *, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """The checkpoint file (with its model card) of a registered version, downloaded from its run's artifacts."""
    version = resolve_version(uri, tracking_uri=tracking_uri)
    target = Path(dst or tempfile.mkdtemp(prefix="action3d-model-"))
    try:
        path = MlflowClient(tracking_uri).download_artifacts(version.run_id, RESCORE_ARTIFACT, str(target))
    except (MlflowException, OSError) as err:
        raise RegistryError(f"{uri} (v{version.version}): cannot fetch its checkpoint {RESCORE_ARTIFACT} from run "
                            f"{version.run_id} ({str(err).splitlines()[0]}): check the artifact store is reachable, "
                            "or use another version (`action3d registry list`)") from None
    return Path(path)


def registry_versions(name: str, *, tracking_uri: str) -> list[dict[str, Any]]:
    """Every version of `name`, newest first: aliases, test metric, test data digest, run, commit, created."""
    client = MlflowClient(tracking_uri)
    versions = _versions_or_error(client, name, tracking_uri)
    aliases = _alias_map(client, name)
    rows = []
    for v in reversed(versions):
        metrics = {k[len("metric."):]: float(val) for k, val in v.tags.items() if k.startswith("metric.")}
        rows.append({"version": str(v.version), "aliases": sorted(a for a, n in aliases.items() if n == str(v.version)),
                     "metric_key": v.tags.get("metric_key"), **metrics,
                     "data_digest": v.tags.get("data_digest"), "run_id": v.run_id,
                     "git_commit": v.tags.get("git_commit") or _run_tag(client, v.run_id, "git_commit"),
                     "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.creation_timestamp / 1000)),
                     "promoted": v.tags.get("promotion_reason")})
    return rows


def _run_tag(client: MlflowClient, run_id: str | None, key: str) -> str | None:
    try:
        return client.get_run(run_id).data.tags.get(key) if run_id else None
    except MlflowException:
        return None


def promote(name: str, version: str, *, alias: str, reason: str, tracking_uri: str) -> dict[str, Any]:
    """Point `alias` at `version` by hand; the reason (and who it replaced) is kept as tags on the version."""
    if not reason.strip():
        raise RegistryError("say why: --reason \"...\" is kept on the version, for whoever looks later")
    target = resolve_version(f"models:/{name}/{version}", tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    previous = _alias_map(client, name).get(alias)
    client.set_registered_model_alias(name, alias, str(target.version))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, value in {"promotion_reason": reason, "promoted_alias": alias, "promoted_at": stamp,
                       "promoted_over": previous or ""}.items():
        client.set_model_version_tag(name, str(target.version), key, value)
    return {"name": name, "version": str(target.version), "alias": alias, "previous": previous, "reason": reason}


def lineage(uri: str, *, tracking_uri: str) -> dict[str, Any]:
    """version -> its training run -> the runs it came from (finetune -> pretrain) -> the data digests and git
    commit each recorded."""
    version = resolve_version(uri, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    chain, run_id = [], version.run_id
    while run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            chain.append({"run_id": run_id, "missing": True})
            break
        tags = run.data.tags
        chain.append({"run_id": run_id, "stage": tags.get("stage"), "git_commit": tags.get("git_commit"),
                      "git_dirty": tags.get("git_dirty"), "params_hash": tags.get("params_hash"),
                      "data": {k[len("data_digest."):]: v for k, v in tags.items() if k.startswith("data_digest.")},
                      "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.info.start_time / 1000))})
        run_id = tags.get("parent_run_id")
    return {"model": f"models:/{version.name}/{version.version}",
            "aliases": sorted(a for a, n in _alias_map(client, version.name).items() if n == str(version.version)),
            "test_data_digest": version.tags.get("data_digest"), "runs": chain}
