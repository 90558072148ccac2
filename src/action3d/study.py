"""The architecture study (the paper's tables: depth and family against accuracy): the pipeline once per model.

Each entry of params.yaml's `study.entries` is a name and its overrides (`model.name=resnet34`, ...). An entry
runs in its own clone of the repository (`.dvc/tmp/study/<study>/<entry>`, git-ignored) that shares the project's
DVC cache, so the data stages run once and the other entries restore them from DVC's run cache; it runs
`dvc repro` of `study.targets` there, records its MLflow runs in the project's store, and comes back as the DVC
experiment `<study>-<entry>` of the project (`dvc exp show`). The entries' rows make one table: model, size, cost,
accuracy, time; an entry that fails is a failed row, not a failed study.

`flows/study.py` fans the entries out on Prefect (one at a time per GPU); everything here is plain Python.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from action3d.atomic import write_csv
from action3d.config import Params, ParamsError, load_params
from action3d.errors import Action3dError
from action3d.workspace import Workspace

COLUMNS = ("entry", "model", "status", "params_m", "gflops", "finetune.video_top1", "finetune.video_top5",
           "finetune.clip_top1", "scratch.video_top1", "scratch.video_top5", "transfer_gain", "seconds", "experiment",
           "error")  # seconds: the entry's wall time (its clone, data restored from DVC's cache, training, evaluation)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class StudyError(Action3dError):
    """A study entry that cannot run: the message names the entry and the key."""


def study_entries(params: Params, entries: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """The entries to run: `entries` when given, else params.yaml's `study.entries`."""
    chosen = dict(params.study.entries if entries is None else entries)
    if not chosen:
        raise StudyError("the study has no entries: list them under study.entries in params.yaml "
                         "(name: [model.name=resnet18, ...])")
    return chosen


def check_entries(params_path: Path, entries: dict[str, list[str]]) -> dict[str, Params]:
    """Each entry's params, validated before any entry runs: names usable as experiment names, known keys and
    values, a model that exists and accepts its kwargs."""
    from action3d.models.summary import count_params

    checked = {}
    for name, overrides in entries.items():
        if not _NAME.fullmatch(name):
            raise StudyError(f"study entry {name!r}: use letters, digits, '.', '_' and '-' (it names a DVC "
                             "experiment and a folder)")
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise StudyError(f"study entry {name!r}: give a list of KEY=VALUE overrides, e.g. "
                             f"[model.name=resnet34], got {overrides!r}")
        try:
            params = load_params(params_path, overrides)
        except ParamsError as err:
            raise StudyError(f"study entry {name!r}: {err}") from None
        try:
            count_params(params.model.name, n_classes=2, **params.model.kwargs)
        except (KeyError, ValueError, TypeError) as err:
            raise StudyError(f"study entry {name!r}: model {params.model.name!r} with kwargs "
                             f"{params.model.kwargs} cannot be built: {err}. `action3d models` lists the models; "
                             "set model.kwargs in the entry (e.g. \"model.kwargs={conv1_t_size: 3}\")") from None
        checked[name] = params
    return checked


def parallel_slots(value: int | str) -> int:
    """Entries run at once: `auto` = one per visible GPU, 1 on CPU (two trainings would share its cores)."""
    if value != "auto":
        return int(value)
    import torch

    return max(1, torch.cuda.device_count())


def entry_workspace(project: Workspace, study: str, entry: str) -> Workspace:
    """A fresh clone of the project's HEAD for one entry, sharing the project's DVC cache (and DVC remote)."""
    folder = project.root / ".dvc" / "tmp" / "study" / study / entry
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    project.run("git", "clone", "--quiet", str(project.root), str(folder))
    ws = Workspace(folder)
    from dvc.repo import Repo

    with Repo(str(project.root)) as repo:
        cache = repo.cache.local_cache_dir  # the project's, wherever its config puts it
    ws.run("dvc", "cache", "dir", "--local", cache)
    local_config = project.root / ".dvc" / "config.local"  # a machine's own remote settings travel along
    if local_config.is_file():
        shutil.copy(local_config, folder / ".dvc" / "config.local")
    return ws


def run_entry(project: Workspace, study: str, entry: str, params: Params, overrides: list[str],
              targets: list[str], *, gpu: str | None = None, tracking_uri: str | None = None,
              study_run_id: str | None = None) -> dict[str, Any]:
    """Run one entry to its row. A failure is a row with status `failed` and the error's last line. The entry's
    MLflow runs are tagged with the study and nested under `study_run_id`: knobs of the entry's own params.yaml
    (tracking.tags, tracking.parent_run), so its DVC experiment records them too."""
    row: dict[str, Any] = {"entry": entry, "model": params.model.name, **model_cost(params)}
    started = time.monotonic()
    try:
        ws = entry_workspace(project, study, entry)
        ws.extra_env.update({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})
        if gpu is not None:
            ws.extra_env["CUDA_VISIBLE_DEVICES"] = gpu
        tracking = [f"tracking.tags={json.dumps({'study': study, 'study_entry': entry})}",
                    *([f"tracking.parent_run={study_run_id}"] if study_run_id else [])]
        ws.set_params([*overrides, *tracking])
        pull = ws.remote() is not None
        stages = ws.stages(targets)
        for stage in stages:
            ws.repro(stage, pull=pull, single=True)
        metrics = ws.metrics()
        experiment = f"{study}-{entry}"
        ws.save_experiment(experiment, stages)
        ws.push_experiment(experiment, cache=pull)  # to the project: `dvc exp show` there lists it
        row.update({k: metrics.get(k) for k in COLUMNS if k in metrics}, status="ok", experiment=experiment)
    except Exception as err:  # noqa: BLE001 - a failed entry is a row of the table, the others go on
        row.update(status="failed", error=_cause(err))
    row["seconds"] = round(time.monotonic() - started, 1)
    return row


def _cause(err: Exception) -> str:
    """What says why a failure happened: the stage's own error (with its indented lines: check lists each problem)
    over DVC's "failed to reproduce"."""
    lines = [line.rstrip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return traceback.format_exception_only(err)[-1].strip()
    telling = [i for i, line in enumerate(lines) if "action3d: error:" in line
               or re.match(r"^\w*(Error|Exception):", line.strip())]
    first = telling[-1] if telling else len(lines) - 1
    said = [lines[first].strip()]
    said += [line.strip() for line in lines[first + 1:] if line.startswith((" ", "\t"))]
    return " ".join(said)[:400]


def model_cost(params: Params) -> dict[str, float]:
    """Parameters (millions) and forward GFLOPs of one clip of the study's input size."""
    from action3d.models.summary import count_flops, count_params

    kwargs = dict(n_classes=2, **params.model.kwargs)  # the head's size barely counts; the table compares trunks
    clip = (params.clip.frames, params.clip.crop_size, params.clip.crop_size)
    try:
        return {"params_m": round(count_params(params.model.name, **kwargs) / 1e6, 3),
                "gflops": round(count_flops(params.model.name, clip, **kwargs) / 1e9, 3)}
    except Exception:  # noqa: BLE001 - the size is informative; the entry's own run reports a real failure
        return {}


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    return write_csv(path, COLUMNS, [[row.get(key, "") for key in COLUMNS] for row in rows])


def markdown_table(study: str, rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (Prefect artifact, README), best fine-tuned accuracy first."""

    def cell(key: str, value) -> str:
        if value is None or value == "":
            return "-"
        return f"{value:.1%}" if "top" in key and isinstance(value, float) else str(value)

    head = ("entry", "model", "status", "params (M)", "GFLOPs", "fine-tuned video top-1", "video top-5",
            "clip top-1", "scratch video top-1", "seconds")
    keys = ("entry", "model", "status", "params_m", "gflops", "finetune.video_top1", "finetune.video_top5",
            "finetune.clip_top1", "scratch.video_top1", "seconds")
    ordered = sorted(rows, key=lambda r: (r.get("status") != "ok", -(r.get("finetune.video_top1") or 0)))
    lines = [f"### Architecture study `{study}`", "", "| " + " | ".join(head) + " |",
             "|" + " --- |" * len(head)]
    for row in ordered:
        values = [cell(k, row.get(k)) for k in keys]
        if row.get("status") != "ok":
            values[2] = f"failed: {row.get('error', '')}"
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"
