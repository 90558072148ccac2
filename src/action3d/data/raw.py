"""Raw videos in a few large tar files, read in place: the route for sets of 10^5 videos and more.

DVC, S3 and every copy pay per file, not per byte (treeverse/dvc#7607: 600k files, hours per push), so a raw set of
Kinetics' size is packed once (`action3d data pack SRC DST`) into `DST/videos/<t>.tar` files of about `shard_mb`
each plus `DST/videos.csv` (each video's path, tar, offset and size), next to the layout's annotation files, copied
as they are. `dvc add DST` then tracks a few hundred files.

Nothing else changes: a packed set is named in params.yaml like any folder (`data.pretrain.path: DST`, its layout
as before), and a video is still `DST/<its path in the layout>`: every reader goes through `open_video`, which
opens the file when it exists and otherwise the member of the packed set above it. A video's tar is a stable hash
of its path (the cache's hash), so with power-of-two tar and slice counts (cache.slices) the videos of one cache
slice come from 1/K of the tars: a worker building a slice pulls those alone.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from tqdm import tqdm

from action3d.atomic import atomic_write, write_atomic_text
from action3d.progress import show_bars

INDEX = "videos.csv"  # marks a packed set
TARS = "videos"  # the folder of its tar files


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv")


def is_video_name(path: str | Path) -> bool:
    """True when the file name has a video extension (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def video_hash(rel_path: str) -> int:
    """A stable 64-bit hash of a video's path in its set: where it goes (raw tar, cache slice and shard), anywhere."""
    return int.from_bytes(hashlib.blake2b(rel_path.encode(), digest_size=8).digest(), "big")


def shard_count(total_bytes: int, shard_mb: float) -> int:
    """Files for `total_bytes`: the smallest power of two that keeps each near `shard_mb` or under. A power of two,
    so that a set that grows past one splits every file in two, each video staying in one half, and so that raw
    tars and cache slices (both powers of two) line up."""
    wanted = max(1, math.ceil(total_bytes / (shard_mb * 2**20)))
    return 1 << (wanted - 1).bit_length()


def fingerprint(path: str | Path, chunk: int = 8192) -> bytes:
    """16 bytes that change when a video file changes: a hash of its size and its first and last `chunk` bytes.

    Cheap on a large set (two small reads per file) and, unlike modification times, kept by copies and checkouts.
    """
    total = size(path)
    digest = hashlib.blake2b(str(total).encode(), digest_size=16)
    with open_video(path) as f:
        digest.update(f.read(chunk))
        if total > chunk:
            f.seek(max(total - chunk, chunk))
            digest.update(f.read(chunk))
    return digest.digest()


@dataclass(frozen=True)
class Member:
    """A video inside a tar of a packed set: its bytes are `size` bytes at `offset` of `tar`."""

    tar: Path
    offset: int
    size: int


class Window(io.RawIOBase):
    """A read-only, seekable view of `size` bytes at `offset` of a file: a tar member as a file (PyAV reads it)."""

    def __init__(self, path: Path, offset: int, size: int):
        super().__init__()
        self._file, self._offset, self._size, self._pos = open(path, "rb"), offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._file.seek(self._offset + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + position)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._file.close()
        super().close()


@functools.lru_cache(maxsize=8)
def packed_index(root: str) -> dict[str, Member] | None:
    """{video path: its member} of the packed set at `root`, or None when `root` is not one."""
    index = Path(root) / INDEX
    if not index.is_file():
        return None
    with open(index, newline="") as f:
        return {row["path"]: Member(Path(root) / TARS / row["tar"], int(row["offset"]), int(row["bytes"]))
                for row in csv.DictReader(f)}


@functools.lru_cache(maxsize=4096)
def _packed_root(folder: str) -> str | None:
    """The nearest folder at or above `folder` that holds a packed set's index."""
    path = Path(folder)
    for candidate in (path, *path.parents):
        if (candidate / INDEX).is_file():
            return str(candidate)
    return None


def member(path: str | Path) -> Member | None:
    """The tar member holding the video at `path`, when `path` is not a file but a video of a packed set."""
    path = Path(path)
    root = _packed_root(str(path.parent))
    if root is None:
        return None
    index = packed_index(root)
    return index.get(path.relative_to(root).as_posix()) if index is not None else None


def exists(path: str | Path) -> bool:
    return Path(path).is_file() or member(path) is not None


def size(path: str | Path) -> int:
    found = None if Path(path).is_file() else member(path)
    return found.size if found is not None else Path(path).stat().st_size


def open_video(path: str | Path) -> IO[bytes]:
    """The bytes of the video at `path`: the file, or its member in a packed set. FileNotFoundError when neither."""
    path = Path(path)
    if path.is_file():
        return open(path, "rb")
    found = member(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no such video (neither a file nor in a packed set's {INDEX})")
    return io.BufferedReader(Window(found.tar, found.offset, found.size))


def listing(root: str | Path) -> Iterator[str]:
    """Every file under `root` as a path relative to it, hidden ones left out: a packed set's videos from its index,
    the other files (annotations) from the disk."""
    root = Path(root)
    index = packed_index(str(root))
    if index is not None:
        yield from index
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (index is not None and Path(folder) == root
                                                                           and d == TARS))
        rel = Path(folder).relative_to(root)
        for name in sorted(files):
            if not name.startswith(".") and not (index is not None and folder == str(root) and name == INDEX):
                yield (rel / name).as_posix()


def pack(source: str | Path, dest: str | Path, *, shard_mb: float = 1024, progress: bool = True) -> dict:
    """Pack the set at `source` (any layout) into `dest`: its videos into tars of about `shard_mb` (a power of two of
    them), every other file copied. Atomic per file; the index is written last, so a `dest` without one is
    unfinished. Returns counts."""
    source, dest = Path(source), Path(dest)
    if (dest / INDEX).exists():
        raise FileExistsError(f"{dest} already holds a packed set ({INDEX}); pack into a new folder")
    files = list(listing(source))
    videos = sorted((f for f in files if is_video_name(f)), key=lambda f: (video_hash(f), f))
    total = sum(size(source / v) for v in videos)
    tars = shard_count(total, shard_mb)
    rows, bar = [], tqdm(total=len(videos), desc="pack", unit="video", disable=not show_bars(progress))
    width = max(5, len(str(tars - 1)))
    for t in range(tars):
        members = [v for v in videos if video_hash(v) % tars == t]
        name = f"{t:0{width}d}.tar"

        def write(f, members=members, name=name) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for rel in members:
                    info = tarfile.TarInfo(rel)
                    info.size, info.mtime, info.mode = size(source / rel), 0, 0o644  # no time: the same bytes again
                    with open_video(source / rel) as video:
                        tar.addfile(info, video)
                    rows.append((rel, name, tar.offset - _padded(info.size), info.size))
                    bar.update()

        atomic_write(dest / TARS / name, write)
    bar.close()
    for rel in files:
        if not is_video_name(rel):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, dest / rel)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "tar", "offset", "bytes"])
    writer.writerows(sorted(rows))
    write_atomic_text(dest / INDEX, buf.getvalue())
    packed_index.cache_clear()
    _packed_root.cache_clear()
    return {"videos": len(videos), "tars": tars, "bytes": total, "other_files": len(files) - len(videos)}


def _padded(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
