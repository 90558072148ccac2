"""Where the project is, where its runs are tracked, and how a store's address may be shown: stdlib only.

Imported by the stages, the tracking package and the CLI alike (it imports nothing of theirs), so that one answer
to "which project, which MLflow store" holds everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# `dvc exp run --queue` runs each experiment in a copy of the repo under .dvc/tmp/exps/; its MLflow runs belong in
# the project's own store, not in a copy that is deleted afterwards.
_DVC_EXP_COPY = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
TRACKING_DB = "mlflow.db"


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


def tracking_uri(root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else the project's sqlite file (`mlflow.db` beside params.yaml)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) if root else project_root()).resolve() / TRACKING_DB}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (query string dropped), None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0])


# Query parameters whose values are credentials in the URIs of the stores MLflow and SQLAlchemy accept.
_SECRET_QUERY = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "signature", "auth")


def shareable_uri(uri: str, root: str | Path | None = None) -> str:
    """`uri` as a file under git, a log line or an error message may hold it: no credential, no machine path.

    A password in the userinfo and the value of a secret-looking query parameter become `***`
    (`postgresql://user:***@host/db`). A local store (`sqlite:///<path>`, `file://<path>` or a bare path) is
    written relative to `root`, the project root by default (`sqlite:///mlflow.db`): what `tracking_uri()`
    resolves from that root. The result is a record, not an address.
    """
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
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, "***" if any(s in k.lower() for s in _SECRET_QUERY) else v) for k, v in pairs], safe="*/")


def _relative(path: str, root: Path) -> str:
    """`path` relative to `root` (with `..` when it lies outside), as a POSIX path."""
    if not os.path.isabs(path):
        return Path(path).as_posix()
    return Path(os.path.relpath(path, root.resolve())).as_posix()


def slug(text: str, keep: str = "-") -> str:
    """`text` as a name folders, URLs and Prefect artifact keys take: lower-case letters, digits and `keep`."""
    return "".join(c if c.isalnum() or c in keep else "-" for c in text.lower()).strip("-")


# --- content digests: what the lineage records of a file or a set of knobs ----------------------------------------


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file's content: what DVC records for it in dvc.lock, so a run's digest finds its DVC output."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def digest(*parts: Any, length: int = 12) -> str:
    """A short stable hash of JSON-able parts (knobs, input digests): resume keys, params hashes."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
