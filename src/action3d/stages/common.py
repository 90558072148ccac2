"""What every stage shares: where the project lives, the tracking store, the device, small atomic writers."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from action3d.atomic import write_atomic_text

# `dvc exp run --queue` runs each experiment in a copy of the repo under .dvc/tmp/exps/; its MLflow runs belong in
# the project's own store, not in a copy that is deleted afterwards.
_DVC_EXP_COPY = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


def project_root(start: str | Path | None = None) -> Path:
    """The folder holding params.yaml and .dvc: the current directory or the nearest parent that has .dvc."""
    here = Path(start or Path.cwd()).resolve()
    text = str(here)
    if _DVC_EXP_COPY in text:
        return Path(text.split(_DVC_EXP_COPY)[0])
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the project's sqlite file (`mlflow.db` beside params.yaml)."""
    from action3d.tracking import resolve_tracking_uri  # mlflow loads only in stages that track

    return resolve_tracking_uri(project_root() / "mlflow.db")


def pick_device(name: str):
    """'auto' = CUDA when present (the local rank's GPU under torchrun), else the CPU; anything else as given."""
    import torch

    from action3d.distributed import init_distributed

    info = init_distributed()
    return info.device if name == "auto" else torch.device(name)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (a crash leaves the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def write_csv(path: str | Path, header: list[str], rows: list[list]) -> Path:
    """Write a CSV atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write_atomic_text(path, buf.getvalue())


def training_run_id(model_path: str | Path) -> str | None:
    """The MLflow run that trained `model_path`: from the run.json a training stage writes beside its model.pt."""
    run_file = Path(model_path).parent / "run.json"
    return json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None


def read_json(path: str | Path, what: str) -> Any:
    from action3d.errors import Action3dError

    path = Path(path)
    if not path.is_file():
        raise Action3dError(f"{path} not found: it is written by the {what} stage; run `dvc repro {what}` first")
    return json.loads(path.read_text())


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (knobs, input file hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
