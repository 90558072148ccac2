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


# Query parameters whose values are credentials in the URIs of the stores MLflow and SQLAlchemy accept.
_SECRET_QUERY = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "signature", "auth")


def shareable_uri(uri: str, root: str | Path | None = None) -> str:
    """`uri` as a file under git may hold it: no credential, no absolute path of this machine.

    A password in the userinfo and the value of a secret-looking query parameter become `***`
    (`postgresql://user:***@host/db`). A local store (`sqlite:///<path>`, `file://<path>` or a bare path) is
    written relative to `root`, the project root by default (`sqlite:///mlflow.db`): what `tracking_uri()`
    resolves from that root. The result is a record, not an address: read the store through `tracking_uri()`.
    """
    from urllib.parse import urlsplit, urlunsplit

    root = Path(root) if root is not None else project_root()
    scheme, sep, rest = uri.partition(":")
    if not sep or len(scheme) == 1:  # a bare path (a Windows drive letter is not a scheme)
        return _relative(uri, root)
    if scheme.startswith("sqlite") and rest.startswith("///"):
        path, qmark, query = rest[3:].partition("?")
        path = path if path == ":memory:" or not path else _relative(path, root)
        return f"{scheme}:///{path}{qmark}{_redact_query(query)}"
    if scheme == "file":
        return _relative(urlsplit(uri).path, root)
    parts = urlsplit(uri)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query=_redact_query(parts.query)))


def _redact_query(query: str) -> str:
    from urllib.parse import parse_qsl, urlencode

    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, "***" if any(s in k.lower() for s in _SECRET_QUERY) else v) for k, v in pairs], safe="*/")


def _relative(path: str, root: Path) -> str:
    """`path` relative to `root` (with `..` when it lies outside), as a POSIX path."""
    if not os.path.isabs(path):
        return Path(path).as_posix()
    return Path(os.path.relpath(path, root.resolve())).as_posix()


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


def cache_digest(cache_dir: str | Path) -> str | None:
    """The frame cache's content, cheaply: its index.csv names every pack with its frames, size and bytes."""
    from action3d.data.cache import INDEX
    from action3d.storage import file_md5

    index = Path(cache_dir) / INDEX
    return file_md5(index) if index.is_file() else None


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (knobs, input file hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
