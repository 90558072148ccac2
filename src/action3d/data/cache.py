"""Raw videos -> a training-ready cache: one file per video holding its frames as JPEGs at training resolution.

Why this format (measured, see benchmarks/loading.py and the README): a random 16-frame clip from a web video with
sparse keyframes costs a decode from the last keyframe, and the reference's JPEG folders cost one file per frame
(hundreds of thousands of small files that DVC pushes to S3 for hours, treeverse/dvc#7607). A *frame pack* keeps
one file per video, reads a clip with one seek and one read, and decodes only the frames of that clip.

Frame pack layout (little endian), extension `.jpack`:

    magic    8 bytes  b"A3DJPK2\\0"
    header   uint32 frames, uint32 height, uint32 width, float64 fps, 16 bytes source fingerprint
    offsets  uint64 x (frames + 1): byte offset of each JPEG from the start of the data, then the data's length
    data     the JPEG files, one per frame, back to back

The cache mirrors the data root: `<cache_root>/<manifest path>.jpack`, plus `index.csv` (what is cached, its frame
count and size, the error for each video that could not be read, and a note for each video that was truncated: its
frames decoded are cached, and `cache_report.json` lists it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from action3d.data.video import VideoReadError, atomic_path, stated_frames, write_atomic_text
from action3d.errors import Action3dError
from action3d.progress import show_bars

log = logging.getLogger(__name__)

MAGIC = b"A3DJPK2\0"
_HEADER = struct.Struct("<IIId16s")
SUFFIX = ".jpack"
INDEX = "index.csv"
REPORT = "cache_report.json"


class CacheError(Action3dError, RuntimeError):
    """A cache file is missing, truncated or not a frame pack; the message names it."""


# --- the frame pack --------------------------------------------------------------------------------------------


def encode_jpegs(frames: np.ndarray, *, quality: int = 90) -> list[bytes]:
    """JPEG-encode frames uint8 [T, H, W, 3] (RGB) with PIL (4:2:0, like the reference's ffmpeg frames)."""
    from PIL import Image

    out = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_pack(
    path: str | Path, jpegs: Sequence[bytes], *, height: int, width: int, fps: float, source: bytes = b""
) -> None:
    """Write JPEG frames into one frame pack at `path`, atomically. `source` is the fingerprint of the video it
    was made from (`fingerprint`), so that a resumed build can tell a stale pack from a finished one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(len(jpegs) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(j) for j in jpegs])
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + _HEADER.pack(len(jpegs), height, width, float(fps), source) + offsets.tobytes())
            for j in jpegs:
                f.write(j)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fingerprint(path: str | Path, chunk: int = 8192) -> bytes:
    """16 bytes that change when a video file changes: a hash of its size and its first and last `chunk` bytes.

    Cheap on a large set (two small reads per file) and, unlike modification times, kept by copies and checkouts.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            digest.update(f.read(chunk))
    return digest.digest()


@dataclass(frozen=True)
class PackInfo:
    frames: int
    height: int
    width: int
    fps: float


class FramePack:
    """Random access to the frames of one `.jpack` file.

    `read(indices)` returns uint8 [T, 3, H, W] (torch) for any frame indices (repeats and any order allowed): it
    reads the byte span from the smallest to the largest index once and decodes each needed JPEG once.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(MAGIC) + _HEADER.size)
                if len(head) < len(MAGIC) + _HEADER.size or head[: len(MAGIC)] != MAGIC:
                    raise CacheError(f"{self.path}: not a frame pack (bad magic); delete it and rebuild the cache")
                frames, height, width, fps, self.source = _HEADER.unpack(head[len(MAGIC):])
                raw = f.read(8 * (frames + 1))
        except OSError as err:
            raise CacheError(f"{self.path}: cannot read ({err}); rebuild the cache") from err
        if len(raw) != 8 * (frames + 1):
            raise CacheError(f"{self.path}: truncated header; delete it and rebuild the cache")
        self.info = PackInfo(frames, height, width, fps)
        self._offsets = np.frombuffer(raw, dtype="<u8").astype(np.int64)
        self._data_start = len(MAGIC) + _HEADER.size + len(raw)

    @property
    def complete(self) -> bool:
        """True when the file is as long as its header says (a copy cut short is not)."""
        return self.path.stat().st_size == self._data_start + int(self._offsets[-1])

    @property
    def frames(self) -> int:
        return self.info.frames

    def read_jpegs(self, indices: Sequence[int]) -> dict[int, bytes]:
        """The JPEG bytes of each distinct frame in `indices`."""
        wanted = sorted(set(int(i) for i in indices))
        if not wanted:
            return {}
        if wanted[0] < 0 or wanted[-1] >= self.info.frames:
            bad = wanted[0] if wanted[0] < 0 else wanted[-1]
            raise IndexError(f"{self.path}: frame {bad} outside 0..{self.info.frames - 1}")
        lo, hi = self._offsets[wanted[0]], self._offsets[wanted[-1] + 1]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + lo)
            span = f.read(hi - lo)
        if len(span) != hi - lo:
            raise CacheError(f"{self.path}: truncated data; delete it and rebuild the cache")
        return {i: span[self._offsets[i] - lo: self._offsets[i + 1] - lo] for i in wanted}

    def read(self, indices: Sequence[int]):
        """Frames `indices` as a uint8 tensor [T, 3, H, W]."""
        import torch

        jpegs = self.read_jpegs(indices)
        keys = list(jpegs)
        try:
            decoded = _decode_jpegs([jpegs[k] for k in keys])
        except (RuntimeError, OSError, ValueError) as err:
            raise CacheError(f"{self.path}: corrupt JPEG data ({err}); delete it and rebuild the cache") from err
        by_index = dict(zip(keys, decoded))
        return torch.stack([by_index[int(i)] for i in indices])


def _decode_jpegs(blobs: Sequence[bytes]) -> list:
    """Decode JPEGs to uint8 tensors [3, H, W]: torchvision's libjpeg-turbo decoder (1.5x PIL's speed here),
    PIL where torchvision no longer has it (deprecated in 0.29 in favour of TorchCodec)."""
    import torch

    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        decode_jpeg = None
    if decode_jpeg is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs])
    from PIL import Image

    return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1) for b in blobs]


def cache_path(cache_root: str | Path, rel_path: str) -> Path:
    """Where the frame pack of the video at `rel_path` (relative to the data root) lives."""
    return Path(cache_root) / f"{rel_path}{SUFFIX}"


# --- building ----------------------------------------------------------------------------------------------------


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `short_side`, aspect ratio kept (rounded to whole pixels)."""
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


class Decoded(NamedTuple):
    """What `decode_scaled` got from a video: frames uint8 [T, h, w, 3], fps, and `truncated`: empty for a whole
    video, else what shows it is cut short ("decoded 12 frames, container says 50")."""

    frames: np.ndarray
    fps: float
    truncated: str = ""


def decode_scaled(path: str | Path, short_side: int) -> Decoded:
    """Decode every frame of `path` scaled (area filter) so its short side is `short_side`.

    A video that stops decoding part way (a file cut short, a corrupt packet) keeps the frames decoded before, and
    says so in `truncated`: when the decoder raised, or when it ended quietly on fewer frames than the container
    states (by more than a frame and 2%: containers' counts of whole videos are that loose).
    """
    import av

    frames, stopped, stated = [], "", 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            stated = stated_frames(container, stream, fps)
            size = None
            for frame in container.decode(stream):
                if size is None:
                    size = scaled_size(frame.height, frame.width, short_side)
                frames.append(frame.reformat(width=size[1], height=size[0], format="rgb24",
                                             interpolation="AREA").to_ndarray())
    except VideoReadError:
        raise
    except Exception as err:  # PyAV raises many types for a bad file; a partial decode is kept below
        if not frames:
            raise VideoReadError(path, f"{type(err).__name__}: {err}") from err
        stopped = f" (decoding stopped: {type(err).__name__}: {err})"
    if not frames:
        raise VideoReadError(path, "no decodable frame")
    truncated = ""
    if stopped or (stated and len(frames) < stated - max(1, stated // 50)):
        truncated = f"decoded {len(frames)} frames" + (f", container says {stated}" if stated else "") + stopped
        log.warning("%s: truncated, %s; caching those frames", path, truncated)
    return Decoded(np.stack(frames), fps, truncated)


@dataclass(frozen=True)
class _Job:
    source: str
    target: str
    short_side: int
    quality: int


@dataclass(frozen=True)
class CacheEntry:
    """One line of index.csv. `error` is empty for a cached video."""

    path: str
    frames: int = 0
    height: int = 0
    width: int = 0
    fps: float = 0.0
    bytes: int = 0
    error: str = ""
    truncated: str = ""  # why the video looks cut short (its frames decoded are cached), see `Decoded`


def _is_done(target: Path, short_side: int, source: Path) -> PackInfo | None:
    """The pack's info when it is whole, at the wanted resolution and made from the video now at `source`."""
    if not target.exists() or not source.exists():
        return None
    try:
        pack = FramePack(target)
    except CacheError:
        return None
    info = pack.info
    fresh = pack.source == fingerprint(source)
    return info if fresh and pack.complete and min(info.height, info.width) == short_side else None


def _cache_one(job: _Job) -> tuple[PackInfo | None, str, str]:
    """(info, "", truncated) for a cached video, (None, error, "") for one that could not be read."""
    try:
        source = fingerprint(job.source)
        frames, fps, truncated = decode_scaled(job.source, job.short_side)
    except (VideoReadError, OSError) as err:
        return None, str(err), ""
    height, width = frames.shape[1:3]
    write_pack(job.target, encode_jpegs(frames, quality=job.quality), height=height, width=width, fps=fps,
               source=source)
    return PackInfo(len(frames), frames.shape[1], frames.shape[2], fps), "", truncated


@dataclass
class CacheReport:
    """What `build_cache` did: counts, bytes, the videos it could not read (path -> reason), the videos cut short
    (path -> what shows it; their frames decoded are cached) and those shorter than a clip."""

    cache_root: str
    videos: int = 0
    built: int = 0
    reused: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    short: dict[str, int] = field(default_factory=dict)  # videos with fewer frames than min_frames
    truncated: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"cache {self.cache_root}: {self.videos} videos ({self.built} built, {self.reused} reused), "
                 f"{self.bytes / 1e6:.1f} MB"]
        lines += [f"  unreadable, skipped: {p} ({why})" for p, why in sorted(self.failed.items())]
        lines += [f"  truncated, cached the frames decoded: {p} ({why})" for p, why in sorted(self.truncated.items())]
        lines += [f"  shorter than a clip, will be loop-padded: {p} ({n} frames)"
                  for p, n in sorted(self.short.items())]
        return "\n".join(lines)


def manifest_paths(manifests: str | Path | Iterable[str | Path]) -> list[str]:
    """Every distinct `path` in the given manifest CSVs (or every *.csv in a folder), in first-seen order."""
    if isinstance(manifests, (str, Path)) and Path(manifests).is_dir():
        files = sorted(Path(manifests).glob("*.csv"))
    elif isinstance(manifests, (str, Path)):
        files = [Path(manifests)]
    else:
        files = [Path(m) for m in manifests]
    seen: dict[str, None] = {}
    for file in files:
        with open(file, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(f"{file}: not a manifest (no 'path' column); build it with `action3d data split`")
            for row in reader:
                seen.setdefault(row["path"], None)
    return list(seen)


def build_cache(
    manifests: str | Path | Iterable[str | Path],
    data_root: str | Path,
    cache_root: str | Path,
    *,
    short_side: int = 128,
    quality: int = 90,
    min_frames: int = 16,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> CacheReport:
    """Cache every video named in `manifests` (CSV files, or a folder of them) as frame packs; return a report.

    Videos are decoded with PyAV, scaled (area filter) to `short_side`, JPEG-encoded at `quality` and packed, in
    parallel over `workers` processes (default: every core) with a progress bar. Resumable: a pack already present
    is kept when it is whole, at this resolution and made from the same source file (its fingerprint: size, first
    and last bytes), unless `force`; anything else is rebuilt. Writes are atomic. A video that
    cannot be read is recorded in the report and in index.csv and skipped; the loaders leave it out. A video cut
    short (see `decode_scaled`) is cached with the frames it has and recorded in the report and in index.csv.
    """
    data_root, cache_root = Path(data_root), Path(cache_root)
    rels = manifest_paths(manifests)
    report = CacheReport(str(cache_root), videos=len(rels))
    previous = read_index(cache_root)  # a reused pack keeps the truncation noted when it was built
    entries: dict[str, CacheEntry] = {}
    todo: list[_Job] = []
    for rel in rels:
        target = cache_path(cache_root, rel)
        info = None if force else _is_done(target, short_side, data_root / rel)
        if info is not None:
            noted = previous[rel].truncated if rel in previous else ""
            entries[rel] = CacheEntry(rel, info.frames, info.height, info.width, info.fps, target.stat().st_size,
                                      truncated=noted)
            report.reused += 1
        else:
            todo.append(_Job(str(data_root / rel), str(target), short_side, quality))
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(todo), desc="cache", unit="video", disable=not show_bars(progress))
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(_cache_one, todo, chunksize=2) if pool else map(_cache_one, todo)
        for job, (info, error, truncated) in zip(todo, results):
            rel = str(Path(job.source).relative_to(data_root))
            if info is None:
                Path(job.target).unlink(missing_ok=True)  # a pack of an older version of it would mislead
                entries[rel] = CacheEntry(rel, error=error)
                report.failed[rel] = error
                log.warning("skipped unreadable video %s", error)
            else:
                entries[rel] = CacheEntry(rel, info.frames, info.height, info.width, info.fps,
                                          Path(job.target).stat().st_size, truncated=truncated)
                report.built += 1
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    for rel in rels:
        entry = entries[rel]
        report.bytes += entry.bytes
        if entry.truncated:
            report.truncated[rel] = entry.truncated
        if not entry.error and entry.frames < min_frames:
            report.short[rel] = entry.frames
    write_index(cache_root, [entries[r] for r in rels])
    write_atomic_text(cache_root / REPORT, json.dumps(asdict(report), indent=2) + "\n")
    return report


def cache_digest(cache_root: str | Path) -> str | None:
    """The cache's content, cheaply: its index names every pack with its frames, size and bytes (None: no cache)."""
    from action3d.project import file_md5

    index = Path(cache_root) / INDEX
    return file_md5(index) if index.is_file() else None


def write_index(cache_root: str | Path, entries: Sequence[CacheEntry]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CacheEntry.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow(asdict(e))
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    write_atomic_text(Path(cache_root) / INDEX, buf.getvalue())


def read_index(cache_root: str | Path) -> dict[str, CacheEntry]:
    """index.csv as {relative video path: entry}; empty when the cache has no index yet."""
    path = Path(cache_root) / INDEX
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {
            row["path"]: CacheEntry(row["path"], int(row["frames"]), int(row["height"]), int(row["width"]),
                                    float(row["fps"]), int(row["bytes"]), row["error"], row.get("truncated", ""))
            for row in csv.DictReader(f)
        }
