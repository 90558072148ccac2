"""Raw videos -> a training-ready cache: the frames of many videos per file (shards), JPEGs at training resolution.

Why this format (measured, see benchmarks/loading.py and benchmarks/scale.py): a random 16-frame clip from a web
video with sparse keyframes costs a decode from the last keyframe, and the reference's JPEG folders cost one file
per frame. Here a video's frames are one *frame pack* (one seek and one read give a clip, and only that clip's
frames are decoded), and packs lie back to back in *shards* of about `shard_mb` each: DVC, S3 and every copy pay
per file (treeverse/dvc#7607: 600k files, hours per push), so Kinetics-400 is a few hundred files, not 260,000.

Frame pack layout (little endian):

    magic    8 bytes  b"A3DJPK2\\0"
    header   uint32 frames, uint32 height, uint32 width, float64 fps, 16 bytes source fingerprint
    offsets  uint64 x (frames + 1): byte offset of each JPEG from the start of the data, then the data's length
    data     the JPEG files, one per frame, back to back

A set's cache (`data/cache/<role>/`) is one folder per *slice* (`slice-<k>/`), each with its shards
(`shard-<s>.a3d`, packs back to back) and `index.csv`: a row per video (its shard, offset and length, frames,
size, fps, source fingerprint; the error of a video that could not be read; a note for one cut short, whose
decoded frames are cached) plus `cache_report.json`. A video's slice is a stable hash of its path modulo the number
of slices, its shard within the slice the same hash, so adding videos moves none: a changed or added video changes
the bytes of its shard alone, and one slice can be built on each of many machines (DVC stage cache@<role>-<k>).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from action3d.atomic import atomic_write, write_atomic_bytes, write_atomic_text
from action3d.data import raw
from action3d.data.raw import shard_count, video_hash  # noqa: F401  (where a video goes: also ours)
from action3d.data.video import VideoReadError, fingerprint, stated_frames
from action3d.errors import Action3dError
from action3d.progress import show_bars

log = logging.getLogger(__name__)

MAGIC = b"A3DJPK2\0"
_HEADER = struct.Struct("<IIId16s")
SUFFIX = ".jpack"  # a pack on its own: the scratch files of a build in progress
SHARD_SUFFIX = ".a3d"
INDEX = "index.csv"
REPORT = "cache_report.json"
SLICE_PREFIX = "slice-"


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


def pack_bytes(jpegs: Sequence[bytes], *, height: int, width: int, fps: float, source: bytes = b"") -> bytes:
    """One frame pack: header, offsets and JPEG frames. `source` is the fingerprint of the video it was made from
    (`fingerprint`), so that a resumed build can tell a stale pack from a finished one."""
    offsets = np.zeros(len(jpegs) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(j) for j in jpegs])
    return b"".join([MAGIC, _HEADER.pack(len(jpegs), height, width, float(fps), source), offsets.tobytes(), *jpegs])


def write_pack(
    path: str | Path, jpegs: Sequence[bytes], *, height: int, width: int, fps: float, source: bytes = b""
) -> None:
    """Write JPEG frames into one frame pack file at `path`, atomically."""
    write_atomic_bytes(path, pack_bytes(jpegs, height=height, width=width, fps=fps, source=source))


@dataclass(frozen=True)
class PackInfo:
    frames: int
    height: int
    width: int
    fps: float


class FramePack:
    """Random access to the frames of one frame pack: a file of its own, or `length` bytes at `offset` in a shard.

    `read(indices)` returns uint8 [T, 3, H, W] (torch) for any frame indices (repeats and any order allowed): it
    reads the byte span from the smallest to the largest index once and decodes each needed JPEG once.
    """

    def __init__(self, path: str | Path, offset: int = 0, length: int | None = None):
        self.path, self.offset, self.length = Path(path), int(offset), length
        where = f"{self.path}" + (f" at byte {self.offset}" if self.offset else "")
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                head = f.read(len(MAGIC) + _HEADER.size)
                if len(head) < len(MAGIC) + _HEADER.size or head[: len(MAGIC)] != MAGIC:
                    raise CacheError(f"{where}: not a frame pack (bad magic); rebuild the cache")
                frames, height, width, fps, self.source = _HEADER.unpack(head[len(MAGIC):])
                raw = f.read(8 * (frames + 1))
        except OSError as err:
            raise CacheError(f"{where}: cannot read ({err}); rebuild the cache") from err
        if len(raw) != 8 * (frames + 1):
            raise CacheError(f"{where}: truncated header; rebuild the cache")
        self.info = PackInfo(frames, height, width, fps)
        self._offsets = np.frombuffer(raw, dtype="<u8").astype(np.int64)
        self._data_start = len(MAGIC) + _HEADER.size + len(raw)

    @property
    def size(self) -> int:
        """The pack's length in bytes, as its header says."""
        return self._data_start + int(self._offsets[-1])

    @property
    def complete(self) -> bool:
        """True when the file holds the whole pack (a copy cut short does not)."""
        return self.path.stat().st_size >= self.offset + self.size and self.length in (None, self.size)

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
            f.seek(self.offset + self._data_start + lo)
            span = f.read(hi - lo)
        if len(span) != hi - lo:
            raise CacheError(f"{self.path}: truncated data; rebuild the cache")
        return {i: span[self._offsets[i] - lo: self._offsets[i + 1] - lo] for i in wanted}

    def read(self, indices: Sequence[int]):
        """Frames `indices` as a uint8 tensor [T, 3, H, W]."""
        import torch

        jpegs = self.read_jpegs(indices)
        keys = list(jpegs)
        try:
            decoded = _decode_jpegs([jpegs[k] for k in keys])
        except (RuntimeError, OSError, ValueError) as err:
            raise CacheError(f"{self.path}: corrupt JPEG data ({err}); rebuild the cache") from err
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


def slice_of(rel_path: str, slices: int) -> int:
    """The slice (0 .. slices - 1) that holds the video at `rel_path`."""
    return video_hash(rel_path) % slices


def shard_of(rel_path: str, slices: int, shards: int) -> int:
    """The shard within its slice; the hash's other digits, so the shards of a slice fill alike."""
    return video_hash(rel_path) // slices % shards


def slice_dir(cache_root: str | Path, k: int) -> Path:
    return Path(cache_root) / f"{SLICE_PREFIX}{k}"


# --- building ----------------------------------------------------------------------------------------------------


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `short_side`, aspect ratio kept (rounded to whole pixels)."""
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


def scaled_stream(container, stream, short_side: int) -> Iterator[np.ndarray]:
    """The frames of `stream`, decoded and scaled (area filter) so that the short side is `short_side`, RGB uint8
    [h, w, 3], one at a time: the one decode path of the frame cache (training, evaluation) and of `action3d
    predict` and the served model (action3d.predict), so a served model sees what it was trained on."""
    size = None
    for frame in container.decode(stream):
        if size is None:
            size = scaled_size(frame.height, frame.width, short_side)
        yield frame.reformat(width=size[1], height=size[0], format="rgb24", interpolation="AREA").to_ndarray()


def as_cached(frame: np.ndarray, quality: int):
    """A scaled frame as the cache gives it back to the loaders (uint8 tensor [3, h, w]): through the cache's JPEG
    encoder at `quality` and its decoder. Predict and serving put every frame through it: the same pixels."""
    return _decode_jpegs(encode_jpegs(frame[None], quality=quality))[0]


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
        with raw.open_video(path) as source, av.open(source) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            stated = stated_frames(container, stream, fps)
            for frame in scaled_stream(container, stream, short_side):
                frames.append(frame)
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
    target: str  # the scratch pack
    short_side: int
    quality: int


@dataclass(frozen=True)
class CacheEntry:
    """One line of a slice's index.csv. `error` is empty for a cached video; `shard` is relative to the cache root
    when read by `read_index`, to the slice folder in the file."""

    path: str
    shard: str = ""
    offset: int = 0
    bytes: int = 0
    frames: int = 0
    height: int = 0
    width: int = 0
    fps: float = 0.0
    fingerprint: str = ""  # hex of `fingerprint(video)`: the source the frames were made from
    error: str = ""
    truncated: str = ""  # why the video looks cut short (its frames decoded are cached), see `Decoded`


def _is_done(target: Path, short_side: int, source: Path) -> PackInfo | None:
    """The scratch pack's info when it is whole, at the wanted resolution and made from the video now at `source`."""
    if not target.exists() or not raw.exists(source):
        return None
    try:
        pack = FramePack(target)
    except CacheError:
        return None
    info = pack.info
    fresh = pack.source == fingerprint(source)
    return info if fresh and pack.complete and min(info.height, info.width) == short_side else None


def _cache_one(job: _Job) -> tuple[PackInfo | None, str, str]:
    """(info, "", truncated) for a video packed into its scratch file, (None, error, "") for one not readable."""
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
    """What a build did: counts, bytes, shards, the videos it could not read (path -> reason), the videos cut short
    (path -> what shows it; their frames decoded are cached) and those shorter than a clip."""

    cache_root: str
    videos: int = 0
    built: int = 0
    reused: int = 0
    shards: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    short: dict[str, int] = field(default_factory=dict)  # videos with fewer frames than min_frames
    truncated: dict[str, str] = field(default_factory=dict)

    def add(self, other: CacheReport) -> None:
        for name in ("videos", "built", "reused", "shards", "bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed.update(other.failed)
        self.short.update(other.short)
        self.truncated.update(other.truncated)

    def summary(self) -> str:
        lines = [f"cache {self.cache_root}: {self.videos} videos ({self.built} built, {self.reused} reused) in "
                 f"{self.shards} shard(s), {self.bytes / 1e6:.1f} MB"]
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


def build_slice(
    videos: Sequence[str],
    data_root: str | Path,
    out: str | Path,
    *,
    slices: int = 1,
    short_side: int = 128,
    quality: int = 90,
    shard_mb: float = 256,
    min_frames: int = 16,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> CacheReport:
    """Cache `videos` (paths relative to `data_root`, one slice of `slices`) into the folder `out`: shards + index.

    Each video is decoded with PyAV, scaled (area filter) to `short_side`, JPEG-encoded at `quality` into a frame
    pack, in parallel over `workers` processes (default: every core) with a progress bar. The packs go to a scratch
    folder beside `out` (`.<name>.build`, which DVC ignores), then into shards in hash order, written atomically,
    and the scratch folder is removed: a build killed part way resumes from the packs already made (a pack is
    reused when whole, at this resolution and made from the same file: its fingerprint), unless `force`. A video
    that cannot be read is recorded in index.csv and the report and skipped (the loaders leave it out); one cut
    short (see `decode_scaled`) is cached with the frames it has and recorded too. Memory stays one pack per
    worker whatever the slice's size. The result is a function of the videos and the knobs alone: the same on any
    machine, in any number of processes.
    """
    data_root, out = Path(data_root), Path(out)
    scratch = out.with_name(f".{out.name}.build")
    rels = sorted(dict.fromkeys(videos), key=lambda r: (video_hash(r), r))
    report = CacheReport(str(out), videos=len(rels))
    jobs: dict[str, _Job] = {}
    infos: dict[str, PackInfo] = {}
    for rel in rels:
        target = scratch / f"{video_hash(rel):016x}{SUFFIX}"
        info = None if force else _is_done(target, short_side, data_root / rel)
        if info is not None:
            infos[rel] = info
            report.reused += 1
        else:
            jobs[rel] = _Job(str(data_root / rel), str(target), short_side, quality)
    scratch.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    truncated: dict[str, str] = _previous_truncations(scratch)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = tqdm(total=len(jobs), desc=f"cache {out.name}", unit="video", disable=not show_bars(progress))
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        todo = list(jobs.values())
        results = pool.map(_cache_one, todo, chunksize=2) if pool else map(_cache_one, todo)
        for rel, (info, error, cut) in zip(jobs, results):
            if info is None:
                Path(jobs[rel].target).unlink(missing_ok=True)  # a pack of an older version of it would mislead
                errors[rel] = error
                log.warning("skipped unreadable video %s", error)
            else:
                infos[rel] = info
                report.built += 1
                if cut:
                    truncated[rel] = cut
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    write_atomic_text(scratch / "truncated.json", json.dumps(truncated))  # a resumed build still knows them

    sizes = {rel: (scratch / f"{video_hash(rel):016x}{SUFFIX}").stat().st_size for rel in infos}
    shards = shard_count(sum(sizes.values()), shard_mb)
    members: dict[int, list[str]] = {}
    for rel in rels:  # hash order within each shard
        if rel in infos:
            members.setdefault(shard_of(rel, slices, shards), []).append(rel)
    entries = {rel: CacheEntry(rel, error=errors[rel]) for rel in errors}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"shard-*{SHARD_SUFFIX}"):  # shards of an earlier count
        stale.unlink()
    width = max(4, len(str(shards - 1)))
    for s, names in sorted(members.items()):
        shard = f"shard-{s:0{width}d}{SHARD_SUFFIX}"
        offsets = _write_shard(out / shard, [scratch / f"{video_hash(r):016x}{SUFFIX}" for r in names])
        for rel, offset in zip(names, offsets):
            info = infos[rel]
            source = FramePack(scratch / f"{video_hash(rel):016x}{SUFFIX}").source.hex()
            entries[rel] = CacheEntry(rel, shard, offset, sizes[rel], info.frames, info.height, info.width, info.fps,
                                      source, truncated=truncated.get(rel, ""))
    for rel, entry in entries.items():
        if entry.error:
            report.failed[rel] = entry.error
            continue
        report.bytes += entry.bytes
        if entry.truncated:
            report.truncated[rel] = entry.truncated
        if entry.frames < min_frames:
            report.short[rel] = entry.frames
    report.shards = len(members)
    write_index(out, [entries[r] for r in sorted(entries)])
    # what was cached, not how (built or reused, where): the same bytes from any machine, resumed or not
    content = {k: v for k, v in asdict(report).items() if k not in ("cache_root", "built", "reused")}
    write_atomic_text(out / REPORT, json.dumps(content, indent=2) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return report


def _previous_truncations(scratch: Path) -> dict[str, str]:
    try:
        return json.loads((scratch / "truncated.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_shard(path: Path, packs: Sequence[Path]) -> list[int]:
    """Concatenate frame pack files into the shard at `path` (atomically); the offset of each."""
    offsets, position = [], 0
    for pack in packs:
        offsets.append(position)
        position += pack.stat().st_size

    def write(f) -> None:
        for pack in packs:
            with open(pack, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

    atomic_write(path, write)
    return offsets


def build_cache(
    manifests: str | Path | Iterable[str | Path],
    data_root: str | Path,
    cache_root: str | Path,
    *,
    slices: int = 1,
    short_side: int = 128,
    quality: int = 90,
    shard_mb: float = 256,
    min_frames: int = 16,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> CacheReport:
    """Cache every video named in `manifests` (CSV files, or a folder of them) under `cache_root`, one machine: each
    of the `slices` slices built in turn by `build_slice` into `cache_root/slice-<k>/`. Many machines build the
    same folders, one slice each (dvc.yaml's cache@<role>-<k>, flows/cache.py)."""
    rels = manifest_paths(manifests)
    report = CacheReport(str(cache_root))
    for k in range(slices):
        part = [r for r in rels if slice_of(r, slices) == k]
        report.add(build_slice(part, data_root, slice_dir(cache_root, k), slices=slices, short_side=short_side,
                               quality=quality, shard_mb=shard_mb, min_frames=min_frames, workers=workers,
                               force=force, progress=progress))
    return report


def index_files(cache_root: str | Path) -> list[Path]:
    """The index.csv of every slice under `cache_root` (or of `cache_root` itself, a slice folder), in slice order."""
    root = Path(cache_root)
    found = [p / INDEX for p in root.glob(f"{SLICE_PREFIX}*") if (p / INDEX).is_file()]
    if not found and (root / INDEX).is_file():
        return [root / INDEX]
    return sorted(found, key=lambda p: int(p.parent.name[len(SLICE_PREFIX):]) if p.parent.name[
        len(SLICE_PREFIX):].isdigit() else -1)


def cache_digest(cache_root: str | Path) -> str | None:
    """The cache's content, cheaply: its indexes name every video with its shard, offset, bytes and source
    fingerprint (None: no cache)."""
    from action3d.project import file_md5

    files = index_files(cache_root)
    if not files:
        return None
    return hashlib.md5("".join(file_md5(f) for f in files).encode()).hexdigest()


_INT_FIELDS = ("offset", "bytes", "frames", "height", "width")


def write_index(folder: str | Path, entries: Sequence[CacheEntry]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CacheEntry.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow(asdict(e))
    write_atomic_text(Path(folder) / INDEX, buf.getvalue())


def read_index(cache_root: str | Path) -> dict[str, CacheEntry]:
    """Every slice's index.csv as {relative video path: entry}, each entry's shard relative to `cache_root`; empty
    when nothing is cached yet."""
    root, out = Path(cache_root), {}
    for file in index_files(root):
        prefix = file.parent.relative_to(root).as_posix()
        with open(file, newline="") as f:
            reader = csv.DictReader(f)
            if "shard" not in (reader.fieldnames or []):
                raise CacheError(f"{file} is the index of a cache of one file per video, which this version does not "
                                 f"read: delete {root} and run `dvc repro` (the cache stage writes shards now)")
            for row in reader:
                values = {k: int(row[k]) if k in _INT_FIELDS else row[k] for k in CacheEntry.__dataclass_fields__}
                values["fps"] = float(row["fps"])
                if values["shard"] and prefix != ".":
                    values["shard"] = f"{prefix}/{values['shard']}"
                out[row["path"]] = CacheEntry(**values)
    return out


def open_pack(cache_root: str | Path, entry: CacheEntry) -> FramePack:
    """The frame pack of an indexed video, inside its shard."""
    return FramePack(Path(cache_root) / entry.shard, entry.offset, entry.bytes)
