"""Writing files that matter all or nothing: a temporary file beside the target, fsync, then os.replace.

A crash (or a full disk) leaves either the previous file or the new one, never half of one. Checkpoints,
manifests, metrics, CSVs, the cache index, plots, encoded videos and S3 downloads all go through here: `atomic_write`
for bytes we produce, `replacing` for a library that writes to a file name itself.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write, renamed over `path` when the block ends without an
    error and removed otherwise: for a writer that wants a file name (matplotlib, PyAV, boto3's download; tell it
    the format, the name ends in .tmp). A crash leaves `.<name>.<random>.tmp`, which no `*.csv` or `*.json` glob
    of a reader picks up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # on disk before the rename makes it the file
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files: keep outputs readable by the team
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, then rename it over `path`."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def write_atomic_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_atomic_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic_bytes(path, text.encode())


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    with open(src, "rb") as source:
        return atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """JSON, all or nothing (indented, keys sorted: a DVC output under git diffs cleanly)."""
    return write_atomic_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV with a header row, all or nothing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_atomic_text(path, buffer.getvalue())
