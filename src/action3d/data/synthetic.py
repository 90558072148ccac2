"""The built-in demo data: deterministic action videos whose classes are defined by motion alone.

Every video is drawn from seeds: a scene (background, faint clutter, textured sprites), camera shake and sensor
noise (all independent of the class), and a *motion program* (the class) that says where each sprite is, how it is
turned and how large it is in every frame. A single frame therefore says nothing about the label.

Two sets, written in the layouts of the real ones so that the same parsers read both:

- pretraining (`synth_kinetics`, Kinetics layout): 31 primitives, the first 24 by default. First the rotation
  classes, each a *ring* of 2-3 different sprites circling a hub: "orbit clockwise" / "orbit counterclockwise" at
  any steady speed from slow to fast, the same senses "in bursts" (stop and go), "with backsteps" (ratchet) and
  "speeding up", and "pendulum" (back and forth); then "spin clockwise" / "spin counterclockwise" (in place), four
  then four more directions of steady motion, zoom in / out, approach / move apart, bounce, and (beyond 24) stop
  and go, ratchet, oscillate, accelerate, decelerate, pass by, move together. The non-ring primitives are
  performed by three actors at once. Each video is set in a scene drawn at random from a bank of `looks` scenes.
  As Kinetics does for UCF-101, the pretraining classes teach the features the fine-tuning classes need: the sense
  of a rotation, and the rhythms, on another carrier.
- fine-tuning (`synth_ucf101`, UCF-101 layout; `synth_hmdb51`, HMDB-51 layout): a *wheel* of 4-6 identical
  sprites turning about its hub with a class-specific sense and rhythm (slow, fast, stop-and-go, swing, ratchet,
  spin-up). New compositions of the pretraining primitives: a ring of different sprites shows which way it turns
  from any two frames, a wheel of identical sprites only from their order, and slow / fast are one pretraining
  class ("orbit clockwise") split in two. Group g of every class is set in scene g of a second bank: a group's
  clips share scene and actors, every class is shown in every scene (the scene says nothing about the label), the
  test groups' scenes are never in training, and no fine-tuning scene is ever in pretraining (the two banks are
  apart), so what pretraining carries over is motion, not familiar backgrounds.

Why a wheel for fine-tuning: the demo must show that the classes need temporal order (frames shuffled in time
must score near chance). Shuffling keeps the *set* of frames, so any two classes whose frame sets differ (a
horizontal track against a vertical one, a growing sprite against a moving one) stay separable without order.
A wheel of n identical sprites repeats itself every 360/n degrees, and every fine-tuning program turns it by at
least that much in any 16 frames: every class shows the same set of frames (the wheel at every phase), and only
their order tells the classes apart. Clockwise and counterclockwise are mirror images, so train these sets
without horizontal flips (as for Something-Something).

Muted backgrounds and large sprites: the demo trains a tiny 3D CNN for minutes on a CPU, and with few videos and
loud, varied scenes such a network memorises scenes instead of learning motion. The demo's results, and how its
sizes were chosen, are in docs/demo.md.

Encoding follows downloaded web video: H.264, 25 fps, 320x240, a keyframe every 250 frames, B-frames, and by
default CRF 18 (about 400 kb/s here, like 240p web video): decoding cost grows with the bit rate. CRF 23 halves
the encoding time where that matters more. All geometry is in units of the frame height (`u` = height / 240), so a
small test set moves like the real one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import string
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from action3d.data.video import write_atomic_text, write_video
from action3d.progress import show_bars

MARKER = ".synth.json"  # written into every generated root: proves the folder is ours to replace

# --- appearance ------------------------------------------------------------------------------------------------

SHAPES = ("disc", "square", "triangle", "pentagon", "hexagon", "star", "ellipse", "cross")
TEXTURES = ("stripes", "checker", "halves", "spot")  # none is rotation-invariant, so spin stays visible


@dataclass(frozen=True)
class Sprite:
    """A textured shape drawn in its own frame: `radius` in pixels at scale 1, colours RGB 0-255."""

    shape: str
    texture: str
    colour: tuple[float, float, float]
    colour2: tuple[float, float, float]
    radius: float
    freq: float  # stripe / checker frequency in cycles per radius
    phase: float


def _colour(rng: np.random.Generator) -> tuple[float, float, float]:
    return tuple(float(c) for c in rng.uniform(0, 255, 3))


def random_sprite(rng: np.random.Generator, u: float, *, size: tuple[float, float] = (26, 38)) -> Sprite:
    """A sprite of any shape, texture and colours; `size` is the radius range in units of height / 240."""
    c1 = np.array(_colour(rng))
    c2 = np.array(_colour(rng))
    while np.abs(c1 - c2).sum() < 150:  # the texture must show, or turning a disc would be invisible
        c2 = np.array(_colour(rng))
    return Sprite(
        shape=str(rng.choice(SHAPES)),
        texture=str(rng.choice(TEXTURES)),
        colour=tuple(c1),
        colour2=tuple(c2),
        radius=float(rng.uniform(*size) * u),
        freq=float(rng.uniform(1.0, 2.2)),
        phase=float(rng.uniform(0, 2 * math.pi)),
    )


def _polygon_sd(px: np.ndarray, py: np.ndarray, sides: int, apothem: float) -> np.ndarray:
    sd = np.full(px.shape, -np.inf, dtype=np.float32)
    for k in range(sides):
        a = 2 * math.pi * k / sides - math.pi / 2
        np.maximum(sd, px * math.cos(a) + py * math.sin(a) - apothem, out=sd)
    return sd


def _signed_distance(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) in sprite units, radius about 1."""
    if shape == "disc":
        return np.hypot(px, py) - 1.0
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) - 0.8
    if shape == "triangle":
        return _polygon_sd(px, py, 3, 0.55)
    if shape == "pentagon":
        return _polygon_sd(px, py, 5, 0.8)
    if shape == "hexagon":
        return _polygon_sd(px, py, 6, 0.85)
    if shape == "star":
        r, a = np.hypot(px, py), np.arctan2(py, px)
        return r - (0.55 + 0.45 * np.abs(np.cos(2.5 * a)))
    if shape == "ellipse":
        return np.hypot(px, py / 0.55) - 1.0
    if shape == "cross":
        bar = lambda x, y: np.maximum(np.abs(x) - 1.0, np.abs(y) - 0.33)  # noqa: E731
        return np.minimum(bar(px, py), bar(py, px))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _texture_mix(sprite: Sprite, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Weight of colour2 in [0, 1] at sprite coordinates (soft edges, so small sprites alias less)."""
    f = sprite.freq * math.pi
    if sprite.texture == "stripes":
        return 0.5 + 0.5 * np.clip(3 * np.sin(f * px + sprite.phase), -1, 1)
    if sprite.texture == "checker":
        return 0.5 + 0.5 * np.clip(3 * np.sin(f * px) * np.sin(f * py + sprite.phase), -1, 1)
    if sprite.texture == "halves":
        return np.clip(0.5 + 4 * px, 0, 1)
    if sprite.texture == "spot":
        return np.clip(1.0 - 6 * (np.hypot(px - 0.45, py + 0.2) - 0.32), 0, 1)
    raise ValueError(f"unknown texture {sprite.texture!r}; known: {TEXTURES}")


def draw_sprite(canvas: np.ndarray, sprite: Sprite, x: float, y: float, angle: float, scale: float) -> None:
    """Alpha-blend `sprite` into `canvas` (uint8 [H, W, 3], in place) centred at (x, y) pixels.

    `angle` in radians turns the sprite clockwise on screen (image y points down); `scale` multiplies its radius.
    """
    r = sprite.radius * scale
    half = int(math.ceil(1.25 * r)) + 1
    h, w = canvas.shape[:2]
    x0, x1 = max(int(x) - half, 0), min(int(x) + half + 1, w)
    y0, y1 = max(int(y) - half, 0), min(int(y) + half + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    dx = ((np.arange(x0, x1, dtype=np.float32) - x) / r)[None, :]
    dy = ((np.arange(y0, y1, dtype=np.float32) - y) / r)[:, None]
    c, s = math.cos(angle), math.sin(angle)
    px, py = c * dx + s * dy, -s * dx + c * dy  # undo the sprite's turn: texture turns with it
    alpha = np.clip(0.5 - _signed_distance(sprite.shape, px, py) * r, 0.0, 1.0)
    inside = alpha > 0
    if not inside.any():
        return
    a = alpha[inside][:, None]
    mix = _texture_mix(sprite, px[inside], py[inside])[:, None]
    c1, c2 = np.asarray(sprite.colour, np.float32), np.asarray(sprite.colour2, np.float32)
    region = canvas[y0:y1, x0:x1]
    old = region[inside].astype(np.float32)
    region[inside] = (old + a * (c1 + mix * (c2 - c1) - old) + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class Look:
    """Everything about a video's appearance (shared by the clips of one UCF group)."""

    background: np.ndarray  # uint8 [H + 2m, W + 2m, 3]: larger than the frame, so the camera can shake
    sprites: tuple[Sprite, ...]
    noise_sigma: float
    shake: float  # camera shake amplitude in pixels
    margin: int


def _muted(rng: np.random.Generator, spread: float) -> np.ndarray:
    """A colour near mid grey: backgrounds stay quieter than the actors, whatever their hue."""
    return 128 + rng.uniform(-spread, spread, 3)


def random_look(rng: np.random.Generator, width: int, height: int, n_sprites: int = 2) -> Look:
    """A muted background (gradient, blotches, 2-5 faint static shapes) and `n_sprites` independent sprites.

    Backgrounds vary less than actors on purpose: a tiny network trained for minutes must find the motion, and
    loud, varied scenes let it memorise scenes instead (measured: with varied, high-contrast scenes a 3D ResNet-10
    fit its training videos and stayed at chance on new ones).
    """
    u = height / 240
    margin = int(math.ceil(4 * u)) + 1
    h, w = height + 2 * margin, width + 2 * margin
    a, b = _muted(rng, 45), _muted(rng, 45)
    ramp = np.linspace(0, 1, h if rng.random() < 0.5 else w, dtype=np.float32)
    ramp = ramp[:, None, None] if len(ramp) == h else ramp[None, :, None]
    bg = (1 - ramp) * a + ramp * b
    blotch = rng.normal(0, 10, (4, 5, 3)).astype(np.float32)  # low-frequency colour blotches
    yi = np.linspace(0, 3, h)[:, None]
    xi = np.linspace(0, 4, w)[None, :]
    y0, x0 = np.minimum(yi.astype(int), 2), np.minimum(xi.astype(int), 3)
    fy, fx = (yi - y0)[..., None], (xi - x0)[..., None]
    bg = bg + ((1 - fy) * (1 - fx) * blotch[y0, x0] + (1 - fy) * fx * blotch[y0, x0 + 1]
               + fy * (1 - fx) * blotch[y0 + 1, x0] + fy * fx * blotch[y0 + 1, x0 + 1])
    canvas = np.clip(bg, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 6))):  # clutter: faint static shapes like the actors
        clutter = random_sprite(rng, u, size=(8, 24))
        layer = canvas.copy()
        draw_sprite(layer, clutter, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * math.pi), 1.0)
        canvas = ((canvas.astype(np.uint16) * 2 + layer) // 3).astype(np.uint8)
    sprites = tuple(random_sprite(rng, u) for _ in range(n_sprites))
    return Look(canvas, sprites, float(rng.uniform(1.5, 4)), float(rng.uniform(0, 1.0) * u), margin)


# --- motion ----------------------------------------------------------------------------------------------------


class Track(NamedTuple):
    """One sprite through time: arrays [T] of centre x, y (pixels), angle (radians, clockwise), scale."""

    sprite: int
    x: np.ndarray
    y: np.ndarray
    angle: np.ndarray
    scale: np.ndarray


@dataclass(frozen=True)
class Stage:
    """The frame a motion program draws in: `width` x `height` pixels, `n` frames, `u` = height / 240."""

    width: int
    height: int
    n: int

    @property
    def u(self) -> float:
        return self.height / 240


Program = Callable[[np.random.Generator, Stage], list[Track]]


def _const(n: int, value: float) -> np.ndarray:
    return np.full(n, value, dtype=np.float64)


def _unit(deg: float) -> np.ndarray:
    """Screen direction for an angle in degrees measured counterclockwise from 'right' (so 90 = up)."""
    return np.array([math.cos(math.radians(deg)), -math.sin(math.radians(deg))])


def _place(rng: np.random.Generator, st: Stage, offsets: np.ndarray, pad: float) -> np.ndarray:
    """A start point such that start + offsets [T, 2] stays `pad` pixels inside the frame (centred if too long).

    Returns the absolute path [T, 2].
    """
    lo, hi = offsets.min(axis=0), offsets.max(axis=0)
    size = np.array([st.width, st.height], dtype=np.float64)
    room = size - 2 * pad - (hi - lo)
    start = pad - lo + np.where(room > 0, rng.uniform(0, 1, 2) * np.maximum(room, 0), room / 2)
    return start + offsets


def _fit_speed(st: Stage, direction: np.ndarray, speed: float, frames: float, pad: float) -> float:
    """Cap `speed` so that `frames` steps along `direction` fit inside the frame."""
    size = np.array([st.width, st.height], dtype=np.float64) - 2 * pad
    with np.errstate(divide="ignore"):
        limits = size / np.maximum(np.abs(direction) * frames, 1e-9)
    return float(min(speed, limits.min()))


def _single(rng: np.random.Generator, st: Stage, steps: np.ndarray, spin: float = 0.0) -> list[Track]:
    """One sprite following per-frame displacements `steps` [T, 2] (the first row is ignored)."""
    offsets = np.cumsum(np.vstack([[0.0, 0.0], steps[1:]]), axis=0)
    path = _place(rng, st, offsets, pad=20 * st.u)
    angle = rng.uniform(0, 2 * math.pi) + spin * np.arange(st.n)
    return [Track(0, path[:, 0], path[:, 1], angle, _const(st.n, 1.0))]


def move(deg: float) -> Program:
    """Straight steady motion towards screen direction `deg` (0 right, 90 up), 4-6 u per frame."""

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        d = _unit(deg + rng.uniform(-8, 8))
        speed = _fit_speed(st, d, rng.uniform(4.0, 6.0) * st.u, st.n - 1, 20 * st.u)
        return _single(rng, st, np.tile(d * speed, (st.n, 1)))

    return program


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.uniform(0, 360))


def speed_profile(kind: str) -> Program:
    """A random direction with a temporal rhythm: stop and go, ratchet, oscillate, accelerate, decelerate."""

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        d, t = _random_direction(rng), np.arange(st.n)
        if kind == "stop and go":
            cycle = int(rng.integers(8, 11))
            moving = (t % cycle) < cycle // 2
            v = np.where(moving, rng.uniform(6.0, 7.0), 0.0)
        elif kind == "ratchet":  # three steps forward, one back
            v = np.where(t % 4 == 3, -1.0, 1.0) * rng.uniform(5.5, 6.5)
        elif kind == "oscillate":
            amp, period = rng.uniform(35, 55), rng.uniform(10, 14)
            pos = amp * np.sin(2 * math.pi * t / period + rng.uniform(0, 2 * math.pi))
            v = np.diff(pos, prepend=pos[0])
        elif kind in ("accelerate", "decelerate"):
            v = np.linspace(0.5, 8.0, st.n)
            v = v if kind == "accelerate" else v[::-1]
        else:
            raise ValueError(f"unknown speed profile {kind!r}")
        v = v * st.u
        span = np.abs(np.cumsum(v)).max() + 1e-9
        v = v * _fit_speed(st, d, span, 1.0, 20 * st.u) / span
        return _single(rng, st, v[:, None] * d[None, :])

    return program


def spin(sense: float) -> Program:
    """A sprite turning in place (sense +1 clockwise), 8-14 degrees per frame, drifting a little."""

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        drift = _random_direction(rng) * rng.uniform(0, 0.4) * st.u
        return _single(rng, st, np.tile(drift, (st.n, 1)), spin=sense * math.radians(rng.uniform(8, 14)))

    return program


def orbit(sense: float, rhythm: str = "steady") -> Program:
    """A ring of 2-3 sprites (the scene's two actors, alternating) circling a hub (sense +1 clockwise), radius
    50-80 u, with a temporal `rhythm`.

    The turn per frame follows `_rhythm` in units of a 60-90 degree "period" (the spacing of a 4-6 spoke wheel),
    so a ring moves at the speeds of the fine-tuning wheel's spokes; its sprites differ, so it never repeats
    itself within a turn. "steady" draws any constant speed from slow to fast; "swing" goes back and forth (a
    pendulum) and has no sense.
    """

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        count = int(rng.integers(2, 4))
        radius = min(rng.uniform(50, 80) * st.u, 0.5 * st.height - 26 * st.u)
        period = math.radians(rng.uniform(60, 90))
        if rhythm == "steady":
            step = _const(st.n, rng.uniform(0.07, 0.25))
        else:
            step = _rhythm(rhythm, rng, st.n)
        phi = rng.uniform(0, 2 * math.pi) + sense * np.cumsum(step) * period
        hub = np.array([st.width, st.height]) / 2 + rng.uniform(-60, 60, 2) * st.u * np.array([1.0, 0.3])
        scale, tilt = rng.uniform(0.7, 1.0), rng.uniform(0, 2 * math.pi)
        tracks = []
        for k in range(count):
            a = phi + 2 * math.pi * k / count
            tracks.append(Track(k % 2, hub[0] + radius * np.cos(a), hub[1] + radius * np.sin(a), a + tilt,
                                _const(st.n, scale)))
        return tracks

    return program


def zoom(growing: bool) -> Program:
    """A sprite growing from 0.4x to 1.7x its size (or shrinking), exponentially, drifting a little."""

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        scale = np.geomspace(0.4, 1.7, st.n)
        drift = _random_direction(rng) * rng.uniform(0, 0.4) * st.u
        (track,) = _single(rng, st, np.tile(drift, (st.n, 1)))
        return [track._replace(scale=scale if growing else scale[::-1])]

    return program


def _pair(rng: np.random.Generator, st: Stage, a: np.ndarray, b: np.ndarray) -> list[Track]:
    """Two sprites at offsets a, b [T, 2] placed together in the frame."""
    path = _place(rng, st, np.concatenate([a, b]), pad=28 * st.u)
    pa, pb = path[: st.n], path[st.n:]
    angles = rng.uniform(0, 2 * math.pi, 2)
    return [Track(i, p[:, 0], p[:, 1], _const(st.n, ang), _const(st.n, 1.0))
            for i, (p, ang) in enumerate(zip((pa, pb), angles))]


def meet(approaching: bool) -> Program:
    """Two sprites on a random line closing from 190-230 u apart to 45-60 u (or the reverse)."""

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        d = _random_direction(rng)
        far = _fit_speed(st, d, rng.uniform(190, 230) * st.u, 1.0, 28 * st.u)
        gap = np.linspace(far, min(rng.uniform(45, 60) * st.u, far / 2), st.n)
        gap = gap if approaching else gap[::-1]
        return _pair(rng, st, -0.5 * gap[:, None] * d, 0.5 * gap[:, None] * d)

    return program


def two_lanes(opposite: bool) -> Program:
    """Two sprites on parallel lanes 45-70 u apart: passing each other, or moving together."""

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        d = _random_direction(rng)
        side = np.array([-d[1], d[0]]) * rng.uniform(45, 70) * st.u / 2
        speed = rng.uniform(3.0, 4.0) * st.u
        speed = _fit_speed(st, d, speed, st.n - 1, 28 * st.u + 70 * st.u)
        t = (np.arange(st.n) - (st.n - 1) / 2)[:, None]
        a = side + t * speed * d
        b = -side + (-1 if opposite else 1) * t * speed * d
        return _pair(rng, st, a, b)

    return program


def bounce() -> Program:
    """A ball hopping along: horizontal drift and parabolic hops of 40-70 u every 12-18 frames."""

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        t = np.arange(st.n)
        vx = rng.choice([-1, 1]) * rng.uniform(1.5, 3.0) * st.u
        vx = _fit_speed(st, np.array([1.0, 0.0]), abs(vx), st.n - 1, 30 * st.u) * np.sign(vx)
        height, period = rng.uniform(40, 70) * st.u, rng.uniform(12, 18)
        y = -height * np.abs(np.sin(math.pi * t / period + rng.uniform(0, math.pi)))
        path = _place(rng, st, np.stack([vx * t, y], axis=1), pad=30 * st.u)
        return [Track(0, path[:, 0], path[:, 1], _const(st.n, rng.uniform(0, 2 * math.pi)), _const(st.n, 1.0))]

    return program


def replicate(program: Program, copies: int = 3) -> Program:
    """The same motion performed by `copies` actors at once (independent draws of place and pace): several
    actors give a tiny network several times the motion to learn from in every clip."""

    def many(rng: np.random.Generator, st: Stage) -> list[Track]:
        return [track for _ in range(copies) for track in program(rng, st)]

    return many


_PRIMITIVES: dict[str, Program] = {
    "orbit clockwise": orbit(+1), "orbit counterclockwise": orbit(-1),
    "orbit clockwise in bursts": orbit(+1, "stopgo"), "orbit counterclockwise in bursts": orbit(-1, "stopgo"),
    "orbit clockwise with backsteps": orbit(+1, "ratchet"),
    "orbit counterclockwise with backsteps": orbit(-1, "ratchet"),
    "orbit clockwise speeding up": orbit(+1, "spinup"), "orbit counterclockwise speeding up": orbit(-1, "spinup"),
    "pendulum": orbit(+1, "swing"),
    "spin clockwise": spin(+1), "spin counterclockwise": spin(-1),
    "move right": move(0), "move up": move(90), "move left": move(180), "move down": move(270),
    "zoom in": zoom(True), "zoom out": zoom(False),
    "approach": meet(True), "move apart": meet(False),
    "move up right": move(45), "move up left": move(135), "move down left": move(225), "move down right": move(315),
    "bounce": bounce(),
    "stop and go": speed_profile("stop and go"), "ratchet": speed_profile("ratchet"),
    "oscillate": speed_profile("oscillate"), "accelerate": speed_profile("accelerate"),
    "decelerate": speed_profile("decelerate"),
    "pass by": two_lanes(True), "move together": two_lanes(False),
}
PRETRAIN_CLASSES: dict[str, Program] = {
    name: p if name.startswith(("orbit", "pendulum")) else replicate(p) for name, p in _PRIMITIVES.items()
}


# --- the wheel (fine-tuning set) --------------------------------------------------------------------------------


def _rhythm(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-frame turn of the wheel in units of its period (360 / spokes), before the sense is applied.

    Every rhythm turns the wheel by at least one period in any 16 frames (see the module docstring).
    """
    t = np.arange(n)
    # slow and fast are far enough apart in angle that no spoke count or radius gives them the same pixel speed
    # (slow at most 9.0 u per frame, fast at least 10.4 u); slow still turns a period in 16 frames (15 steps), and
    # fast stays well under a quarter of a period per frame: near a quarter, the spoke behind looks as near as the
    # one ahead and the sense is lost (fine-tuned models confused fast clockwise and counterclockwise at 0.22-0.25)
    if kind == "slow":
        return _const(n, rng.uniform(0.067, 0.072))
    if kind == "fast":
        return _const(n, rng.uniform(0.18, 0.21))
    if kind == "stopgo":  # bursts a little faster than fast (a burst must still turn a period in 16 frames), then still
        cycle = int(rng.integers(7, 10))
        return np.where((t + rng.integers(cycle)) % cycle < cycle // 2, rng.uniform(0.21, 0.24), 0.0)
    if kind == "ratchet":  # three steps forward, one back
        return np.where((t + rng.integers(4)) % 4 == 3, -1.0, 1.0) * rng.uniform(0.15, 0.18)
    if kind == "swing":  # back and forth over a full period: no sense
        phase = 0.55 * np.sin(2 * math.pi * t / rng.uniform(10, 13) + rng.uniform(0, 2 * math.pi))
        return np.diff(phase, prepend=phase[0])
    if kind == "spinup":  # speeds up over 8 frames, stops dead, again
        cycle = int(rng.integers(7, 10))
        return 0.3 * ((t + rng.integers(cycle)) % cycle) / (cycle - 1)
    raise ValueError(f"unknown rhythm {kind!r}")


def wheel(rhythm: str, sense: float) -> Program:
    """4-6 identical sprites on a rigid wheel (radius 55-80 u) turning about a hub near the frame centre.

    At least four spokes keep the fast turn under a quarter of a period per frame (an unambiguous sense)."""

    def program(rng: np.random.Generator, st: Stage) -> list[Track]:
        spokes = int(rng.integers(4, 7))
        radius = min(rng.uniform(55, 80) * st.u, 0.5 * st.height - 26 * st.u)
        turn = sense * np.cumsum(_rhythm(rhythm, rng, st.n)) * 2 * math.pi / spokes
        phi = rng.uniform(0, 2 * math.pi) + turn
        hub = np.array([st.width, st.height]) / 2 + rng.uniform(-20, 20, 2) * st.u
        tilt = rng.uniform(0, 2 * math.pi)
        tracks = []
        for k in range(spokes):
            a = phi + 2 * math.pi * k / spokes
            tracks.append(Track(0, hub[0] + radius * np.cos(a), hub[1] + radius * np.sin(a), a + tilt,
                                _const(st.n, 0.7)))
        return tracks

    return program


FINETUNE_CLASSES: dict[str, Program] = {
    "SlowTurnClockwise": wheel("slow", +1), "SlowTurnCounterclockwise": wheel("slow", -1),
    "FastTurnClockwise": wheel("fast", +1), "FastTurnCounterclockwise": wheel("fast", -1),
    "StopGoClockwise": wheel("stopgo", +1), "StopGoCounterclockwise": wheel("stopgo", -1),
    "Swing": wheel("swing", +1),
    "RatchetClockwise": wheel("ratchet", +1), "RatchetCounterclockwise": wheel("ratchet", -1),
    "SpinUpClockwise": wheel("spinup", +1), "SpinUpCounterclockwise": wheel("spinup", -1),
}


# --- rendering ---------------------------------------------------------------------------------------------------


def render(look: Look, tracks: Sequence[Track], rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    """Frames uint8 [H, W, 3] of `tracks` drawn over `look`, with camera shake and sensor noise."""
    m = look.margin
    h, w = look.background.shape[0] - 2 * m, look.background.shape[1] - 2 * m
    noise = [(rng.standard_normal((h, w, 3), dtype=np.float32) * look.noise_sigma).astype(np.int16) for _ in range(3)]
    walk = np.cumsum(rng.normal(0, 1, (n, 2)), axis=0)  # smooth random camera path
    walk = walk - walk.mean(axis=0)
    shake = np.clip(walk / (np.abs(walk).max() + 1e-9) * look.shake, -m + 1, m - 1).round().astype(int)
    for t in range(n):
        canvas = look.background.copy()
        for tr in tracks:
            draw_sprite(canvas, look.sprites[tr.sprite], tr.x[t] + m, tr.y[t] + m, tr.angle[t], tr.scale[t])
        dx, dy = shake[t]
        frame = canvas[m + dy: m + dy + h, m + dx: m + dx + w].astype(np.int16)
        frame += noise[int(rng.integers(len(noise)))]
        yield np.clip(frame, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class VideoJob:
    """One video to write: which program, which look seed (shared by a UCF group), which motion seed."""

    path: str
    program: str  # a key of PRETRAIN_CLASSES or FINETUNE_CLASSES
    look_seed: tuple[int, ...]
    motion_seed: tuple[int, ...]
    width: int
    height: int
    frames: int
    fps: int
    gop: int
    crf: int = 18


def _program(name: str) -> Program:
    table = {**PRETRAIN_CLASSES, **FINETUNE_CLASSES}
    if name not in table:
        raise KeyError(f"unknown motion program {name!r}")
    return table[name]


@functools.lru_cache(maxsize=8)
def _look(seed: tuple[int, ...], width: int, height: int) -> Look:
    return random_look(np.random.default_rng(seed), width, height)


def make_video(job: VideoJob) -> str:
    """Render and encode one job (runs in a worker process). Deterministic in the job's seeds."""
    look = _look(job.look_seed, job.width, job.height)  # read-only: render copies the background
    rng = np.random.default_rng(job.motion_seed)
    tracks = _program(job.program)(rng, Stage(job.width, job.height, job.frames))
    write_video(job.path, render(look, tracks, rng, job.frames), fps=job.fps, gop=job.gop, crf=job.crf)
    return job.path


def run_jobs(
    jobs: Sequence[VideoJob], *, workers: int | None = None, desc: str = "synth", progress: bool = True
) -> None:
    """Write every job, in parallel over `workers` processes (default: every core), with a progress bar."""
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc=desc, unit="video", disable=not show_bars(progress))
    if workers == 1:
        for job in jobs:
            make_video(job)
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(make_video, jobs, chunksize=4):
                bar.update()
    bar.close()


# --- layouts -----------------------------------------------------------------------------------------------------


def _check_size(width: int, height: int, fps: int, seconds: float) -> int:
    if width % 2 or height % 2 or width < 32 or height < 32:
        raise ValueError(f"width and height must be even and at least 32 (H.264 yuv420p); got {width}x{height}")
    frames = int(round(seconds * fps))
    if frames < 1:
        raise ValueError(f"seconds x fps must give at least one frame; got {seconds} s at {fps} fps")
    return frames


def _pick(table: dict[str, Program], n: int, what: str) -> list[str]:
    if not 2 <= n <= len(table):
        raise ValueError(f"{what}: classes must be between 2 and {len(table)} (the motion programs defined); got {n}")
    return list(table)[:n]


class _Staging:
    """Write a generated set into a fresh sibling folder, then swap it in for `root` (ours to replace or absent)."""

    def __init__(self, root: str | Path, params: dict):
        self.root = Path(root)
        self.params = params
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / MARKER).exists():
            raise FileExistsError(
                f"{self.root} exists and was not written by the synthesizer (no {MARKER}); "
                "choose an empty or new folder, or delete it yourself"
            )
        self.tmp = self.root.with_name(f".{self.root.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        write_atomic_text(self.tmp / MARKER, json.dumps(self.params, indent=2, sort_keys=True) + "\n")
        old = self.root.with_name(f".{self.root.name}.old-{os.getpid()}")
        if self.root.exists():
            os.replace(self.root, old)
        os.replace(self.tmp, self.root)
        shutil.rmtree(old, ignore_errors=True)


def _youtube_id(rng: np.random.Generator) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(rng.choice(list(alphabet), 11))


def synth_kinetics(
    root: str | Path,
    *,
    classes: int = 24,
    train_per_class: int = 16,
    val_per_class: int = 3,
    test_per_class: int = 3,
    looks: int = 25,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    seconds: float = 1.6,
    gop: int = 250,
    crf: int = 18,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the pretraining set in the Kinetics layout under `root`; return a summary.

    Layout: `kinetics_{train,val,test}.csv` (header `label,youtube_id,time_start,time_end,split`) and videos at
    `<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`. Labels are the first `classes` names of
    `PRETRAIN_CLASSES` (lower case with spaces, like Kinetics'). Each video is set in one of the `looks` scenes of
    the pretraining bank, drawn at random whatever its class; no fine-tuning set ever shows one of them. Same
    arguments, same bytes.
    """
    frames = _check_size(width, height, fps, seconds)
    names = _pick(PRETRAIN_CLASSES, classes, "synth_kinetics")
    if looks < 1:
        raise ValueError(f"looks must be at least 1; got {looks}")
    params = dict(layout="kinetics", classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                  test_per_class=test_per_class, looks=looks, seed=seed, width=width, height=height, fps=fps,
                  seconds=seconds, gop=gop, crf=crf)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    ids = np.random.default_rng([seed, 1])
    with _Staging(root, params) as out:
        jobs, rows = [], {split: [] for split in counts}
        for split_no, (split, per_class) in enumerate(counts.items()):
            for c, label in enumerate(names):
                for i in range(per_class):
                    yid = _youtube_id(ids)
                    start = int(ids.integers(0, 300))
                    end = start + int(math.ceil(seconds))
                    rel = f"{split}/{label}/{yid}_{start:06d}_{end:06d}.mp4"
                    look = scene_seed(seed, PRETRAIN_BANK, int(ids.integers(looks)))
                    motion = (seed, 12, split_no, c, i)
                    jobs.append(VideoJob(str(out / rel), label, look, motion, width, height, frames, fps, gop))
                    rows[split].append(f"{label},{yid},{start},{end},{split}")
        for split, lines in rows.items():
            text = "label,youtube_id,time_start,time_end,split\n" + "".join(f"{ln}\n" for ln in lines)
            write_atomic_text(out / f"kinetics_{split}.csv", text)
        jobs = [dataclasses.replace(j, crf=crf) for j in jobs]
        run_jobs(jobs, workers=workers, desc="synth kinetics", progress=progress)
        scenes = _scenes(jobs, out)
    counts = {f"{split}_videos": len(lines) for split, lines in rows.items()}
    return {"root": str(root), "classes": names, "videos": len(jobs), **counts, "scenes": scenes}


def _test_groups(groups: int, test_groups: int | None) -> list[list[int]]:
    """Test groups (1-based) of splits 1, 2, 3: consecutive blocks of `test_groups` groups (default about 7/25 of
    them, as in UCF-101, where split 1 tests g1-g7 and g22-g25 always train)."""
    if groups < 2:
        raise ValueError(f"groups must be at least 2 (one to train, one to test); got {groups}")
    size = max(1, round(groups * 7 / 25)) if test_groups is None else test_groups
    if not 1 <= size < groups:
        raise ValueError(f"test_groups must be between 1 and groups - 1 ({groups - 1}); got {size}")
    return [[(s * size + k) % groups + 1 for k in range(size)] for s in range(3)]


PRETRAIN_BANK, FINETUNE_BANK = 7, 8  # the two scene banks: no scene of one is in the other


def scene_seed(seed: int, bank: int, k: int) -> tuple[int, ...]:
    """The seed of scene k of a bank: the same for every set made with the same `seed`."""
    return (seed, bank, k)


def _scenes(jobs: Sequence[VideoJob], root: Path) -> dict[str, tuple[int, ...]]:
    """Each video's scene (the seed it is drawn from), by its path under `root`: which scenes a set shows."""
    return {Path(j.path).relative_to(root).as_posix(): j.look_seed for j in jobs}


def _grouped_jobs(
    out: Path, names: list[str], groups: int, clips: int, seed: int, set_id: int,
    relpath: Callable[[str, int, int], str], width: int, height: int, frames: int, fps: int, gop: int,
) -> list[VideoJob]:
    jobs = []
    for c, name in enumerate(names):
        for g in range(1, groups + 1):
            look = scene_seed(seed, FINETUNE_BANK, g)  # group g: its own scene, in every class, never pretrained on
            for k in range(1, clips + 1):
                motion = (seed, set_id, c, g, k)
                path = str(out / relpath(name, g, k))
                jobs.append(VideoJob(path, name, look, motion, width, height, frames, fps, gop))
    return jobs


def synth_ucf101(
    root: str | Path,
    *,
    classes: int = 7,
    groups: int = 7,
    clips_per_group: int = 3,
    test_groups: int | None = None,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    seconds: float = 1.6,
    gop: int = 250,
    crf: int = 18,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the fine-tuning set in the UCF-101 layout under `root`; return a summary.

    Layout: `<Class>/v_<Class>_gNN_cMM.avi` (H.264 in AVI), `classInd.txt` (`1 Class`, CRLF as the official
    files), `trainlist0{1,2,3}.txt` (`Class/v_Class_g05_c01.avi 1`), `testlist0{1,2,3}.txt` (path only). Group g
    is set in scene g of the fine-tuning bank in every class, so its clips share background and actors; split s
    tests one block of `test_groups` groups and trains on the others.
    """
    frames = _check_size(width, height, fps, seconds)
    names = _pick(FINETUNE_CLASSES, classes, "synth_ucf101")
    params = dict(layout="ucf101", classes=classes, groups=groups, clips_per_group=clips_per_group,
                  test_groups=test_groups, seed=seed, width=width, height=height, fps=fps, seconds=seconds, gop=gop, crf=crf)
    blocks = _test_groups(groups, test_groups)
    rel = lambda name, g, k: f"{name}/v_{name}_g{g:02d}_c{k:02d}.avi"  # noqa: E731
    with _Staging(root, params) as out:
        jobs = _grouped_jobs(out, names, groups, clips_per_group, seed, 21, rel, width, height, frames, fps, gop)
        write_atomic_text(out / "classInd.txt", "".join(f"{i} {n}\r\n" for i, n in enumerate(names, 1)))
        for s, test in enumerate(blocks, 1):
            train_lines, test_lines = [], []
            for c, name in enumerate(names, 1):
                for g in range(1, groups + 1):
                    for k in range(1, clips_per_group + 1):
                        if g in test:
                            test_lines.append(f"{rel(name, g, k)}\r\n")
                        else:
                            train_lines.append(f"{rel(name, g, k)} {c}\r\n")
            write_atomic_text(out / f"trainlist{s:02d}.txt", "".join(train_lines))
            write_atomic_text(out / f"testlist{s:02d}.txt", "".join(test_lines))
        jobs = [dataclasses.replace(j, crf=crf) for j in jobs]
        run_jobs(jobs, workers=workers, desc="synth ucf101", progress=progress)
        scenes = _scenes(jobs, out)
    return {"root": str(root), "classes": names, "videos": len(jobs), "test_groups": blocks, "scenes": scenes}


def synth_hmdb51(
    root: str | Path,
    *,
    classes: int = 7,
    groups: int = 7,
    clips_per_group: int = 3,
    test_groups: int | None = None,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    seconds: float = 1.6,
    gop: int = 250,
    crf: int = 18,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the fine-tuning vocabulary in the HMDB-51 layout under `root`; return a summary.

    Layout: `<action>/<action>_vNN_K.avi` (action names in lower case with underscores; `_vNN` is the source
    video, `_K` the clip) and `splits/<action>_test_split{1,2,3}.txt` with lines `<video>.avi <0|1|2>` (1 train,
    2 test, 0 unused: one training group per split is left unused when there are at least 5 groups).
    """
    frames = _check_size(width, height, fps, seconds)
    camel = _pick(FINETUNE_CLASSES, classes, "synth_hmdb51")
    names = ["".join(f"_{ch.lower()}" if ch.isupper() else ch for ch in n).lstrip("_") for n in camel]
    params = dict(layout="hmdb51", classes=classes, groups=groups, clips_per_group=clips_per_group,
                  test_groups=test_groups, seed=seed, width=width, height=height, fps=fps, seconds=seconds, gop=gop, crf=crf)
    blocks = _test_groups(groups, test_groups)
    rel = lambda name, g, k: f"{name}/{name}_v{g:02d}_{k}.avi"  # noqa: E731
    with _Staging(root, params) as out:
        jobs = _grouped_jobs(out, camel, groups, clips_per_group, seed, 31,
                             lambda n, g, k: rel(names[camel.index(n)], g, k), width, height, frames, fps, gop)
        for s, test in enumerate(blocks, 1):
            unused = next((g for g in range(groups, 0, -1) if g not in test), None) if groups >= 5 else None
            for name in names:
                lines = []
                for g in range(1, groups + 1):
                    flag = 2 if g in test else 0 if g == unused else 1
                    lines += [f"{Path(rel(name, g, k)).name} {flag} \n" for k in range(1, clips_per_group + 1)]
                write_atomic_text(out / "splits" / f"{name}_test_split{s}.txt", "".join(lines))
        jobs = [dataclasses.replace(j, crf=crf) for j in jobs]
        run_jobs(jobs, workers=workers, desc="synth hmdb51", progress=progress)
        scenes = _scenes(jobs, out)
    return {"root": str(root), "classes": names, "videos": len(jobs), "test_groups": blocks, "scenes": scenes}
