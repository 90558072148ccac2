"""Small PyAV helpers shared by the data modules: write a clip atomically, read every frame, probe a file.

Frames are uint8 numpy arrays [T, H, W, 3] (RGB) throughout, the layout PyAV and PIL speak.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from action3d.atomic import replacing, write_atomic_bytes, write_atomic_text  # noqa: F401  (re-exported)
from action3d.data import raw
from action3d.data.raw import VIDEO_EXTENSIONS, fingerprint, is_video_name  # noqa: F401  (re-exported)
from action3d.errors import Action3dError

CONTAINER_FORMATS = {".mp4": "mp4", ".avi": "avi", ".mkv": "matroska", ".mov": "mov", ".m4v": "mp4"}


_X264_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what x264 needs for its AVX-512 code
_X264_AVX2 = {"avx", "avx2", "fma", "abm", "bmi1", "bmi2"}  # x264's "AVX2" level (abm = lzcnt)


@functools.lru_cache(maxsize=1)
def x264_asm_params() -> str:
    """Extra x264-params that keep x264 off its AVX-512 code: ":asm=AVX2" on a CPU with AVX-512, else "".

    With AVX-512 (x264 core 165 as bundled with PyAV 18), macroblock-tree rate control reads stale heap memory, so
    the same frames encode to different bytes depending on what the process allocated before (measured: the
    output changes with MALLOC_PERTURB_; with asm=AVX2 or mbtree=0 it does not). x264's SIMD paths are bit-exact
    with each other otherwise, so AVX2 writes the bytes that machines without AVX-512 write.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:  # not Linux: no CPU flags to read; x264 detects its own
        return ""
    return ":asm=AVX2" if _X264_AVX512 <= flags and _X264_AVX2 <= flags else ""


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    fps: int = 25,
    gop: int = 250,
    crf: int = 23,
    preset: str = "veryfast",
    bframes: int = 3,
) -> None:
    """Encode RGB frames [H, W, 3] uint8 to H.264 (yuv420p) at `path`, atomically.

    `gop` is the keyframe spacing in frames: 250 with scene cuts off mimics downloaded web video (a random seek
    decodes from the last keyframe). One encoder thread: callers parallelise over files, and one thread keeps
    the output bit-identical from run to run, as does keeping x264 off AVX-512 (`x264_asm_params`). Width and
    height must be even (yuv420p).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = CONTAINER_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot write a {path.suffix!r} file; use one of {sorted(CONTAINER_FORMATS)}")
    with replacing(path) as tmp, av.open(str(tmp), mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps)
        ctx = stream.codec_context
        ctx.pix_fmt = "yuv420p"
        ctx.gop_size = gop
        ctx.max_b_frames = bframes
        ctx.thread_count = 1
        ctx.options = {
            "preset": preset,
            "crf": str(crf),
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0" + x264_asm_params(),
        }
        opened = False
        for array in frames:
            if not opened:
                ctx.height, ctx.width = array.shape[:2]
                opened = True
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        if not opened:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)


def read_frames(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame of the first video stream: (frames uint8 [T, H, W, 3] RGB, frames per second).

    Raises `VideoReadError` naming the file when it cannot be opened or holds no decodable frame.
    """
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except VideoReadError:
        raise
    except Exception as err:  # PyAV raises many types (InvalidDataError, EOFError, ...) for a bad file
        raise VideoReadError(path, f"{type(err).__name__}: {err}") from err
    if not frames:
        raise VideoReadError(path, "no decodable frame")
    return np.stack(frames), fps


class VideoReadError(Action3dError, RuntimeError):
    """A video could not be read; `path` names it and `reason` says what failed."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: unreadable video ({reason})")


@dataclass(frozen=True)
class ProbeResult:
    """What a probe learnt about one file. `error` is None for a readable video. `fingerprint` (hex) and `bytes`
    are known for any file that exists; frames, fps and size only when the video was opened."""

    path: str
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    error: str | None = None
    fingerprint: str = ""
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def stated_frames(container, stream, fps: float) -> int:
    """The frame count an open PyAV container states for `stream`: its own count when the container keeps one
    (MP4, AVI), else the stream's duration x `fps`, else the container's (Matroska); 0 when it states none."""
    frames = int(stream.frames or 0)
    if frames == 0 and stream.duration and stream.time_base and fps:
        frames = int(round(float(stream.duration * stream.time_base) * fps))
    if frames == 0 and container.duration and fps:
        frames = int(round(container.duration / 1e6 * fps))
    return frames


def probe_video(path: str | Path, *, decode: bool = True, open_video: bool = True) -> ProbeResult:
    """Fingerprint `path`, then (with `open_video`) open it, read its stream header and (with `decode`) decode its
    first frame. Never raises.

    The frame count comes from the container when it states one, else from duration x frame rate.
    """
    path = Path(path)
    try:
        known = {"fingerprint": fingerprint(path).hex(), "bytes": raw.size(path)}
    except OSError as err:
        return ProbeResult(str(path), error=f"{type(err).__name__}: {err}")
    if known["bytes"] == 0:
        return ProbeResult(str(path), error="zero-byte file", **known)
    if not open_video:
        return ProbeResult(str(path), **known)
    import av

    try:
        with raw.open_video(path) as source, av.open(source) as container:
            if not container.streams.video:
                return ProbeResult(str(path), error="no video stream", **known)
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = stated_frames(container, stream, fps)
            width, height = stream.codec_context.width, stream.codec_context.height
            if decode:
                first = next(container.decode(stream), None)
                if first is None:
                    return ProbeResult(str(path), error="no decodable frame", **known)
                width, height = first.width, first.height
    except Exception as err:  # a probe reports, it never raises
        return ProbeResult(str(path), error=f"{type(err).__name__}: {err}", **known)
    return ProbeResult(str(path), frames=frames, fps=fps, width=width, height=height, **known)
