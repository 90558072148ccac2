"""Train and eval presets (torchvision.transforms.v2 crops and flips) for video clips, after Hara et al.'s recipe.

Training: multiscale corner crop (a square of side min(H, W) x scale, scale drawn from 1, 2^-1/4, 2^-1/2, 2^-3/4,
1/2, at one of the four corners or the centre, resized to `crop_size`), horizontal flip, mean/std normalisation.
Evaluation: the centre square of side min(H, W) resized to `crop_size` (the region of the reference's Resize +
CenterCrop, resampled once instead of twice: docs/fidelity.md), normalisation. The same crop applies to every frame
of a clip. tests/unit/test_reference_parity.py holds both presets to the reference's pixels.

Both take a uint8 clip [T, C, H, W] (`layout="TCHW"`, what the loaders decode) or [C, T, H, W] and return a float
clip [C, T, crop_size, crop_size], the layout 3D CNNs eat. `TrainPreset` draws from the `generator` it is called with
(the loaders pass one seeded per item, so a clip's crop and flip do not depend on which worker made it), else from
torch's global generator. pytorchvideo.transforms is not used: it does not import with torchvision >= 0.17.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# Kinetics mean and std of RGB in [0, 1], as in the reference (3D-ResNets-PyTorch, get_mean_std)
KINETICS_MEAN = (0.4345, 0.4051, 0.3775)
KINETICS_STD = (0.2768, 0.2713, 0.2737)
PAPER_SCALES = (1.0, 2 ** -0.25, 2 ** -0.5, 2 ** -0.75, 0.5)
CORNERS = ("c", "tl", "tr", "bl", "br")

Layout = Literal["TCHW", "CTHW"]


def _crop_resize(inpt: Any, params: dict[str, Any], size: int) -> Any:
    """Crop, then resize to size x size with antialiasing. uint8 goes channels-last after the crop (a view) and
    before the resize: torch's vectorised uint8 resize wants that layout and is several times faster with it."""
    out = F.crop(inpt, **params)
    if isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.ndim == 4:
        out = tv_tensors.wrap(out.contiguous(memory_format=torch.channels_last), like=out) if isinstance(
            out, tv_tensors.TVTensor) else out.contiguous(memory_format=torch.channels_last)
    return F.resize(out, [size, size], antialias=True)


class MultiScaleCornerCrop(v2.Transform):
    """Crop a square of side int(min(H, W) * scale) at a corner or the centre, resize it to `size` x `size`.

    `scale` and the position are drawn uniformly from `scales` and `positions` (c, tl, tr, bl, br) once per call,
    so every frame of a clip gets the same crop.
    """

    def __init__(self, size: int, *, scales: Sequence[float] = PAPER_SCALES, positions: Sequence[str] = CORNERS):
        super().__init__()
        unknown = set(positions) - set(CORNERS)
        if unknown or not positions:
            raise ValueError(f"positions must be a non-empty subset of {CORNERS}; got {list(positions)}")
        if not scales or not all(0 < s <= 1 for s in scales):
            raise ValueError(f"scales must be in (0, 1]; got {list(scales)}")
        self.size, self.scales, self.positions = int(size), tuple(scales), tuple(positions)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.draw(*F.get_size(next(i for i in flat_inputs if isinstance(i, torch.Tensor))))

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A crop (top, left, height, width) of a `height` x `width` frame, drawn from `generator`."""
        scale = self.scales[int(torch.randint(len(self.scales), (), generator=generator))]
        position = self.positions[int(torch.randint(len(self.positions), (), generator=generator))]
        side = max(1, int(min(height, width) * scale))
        top = {"c": (height - side) // 2, "tl": 0, "tr": 0, "bl": height - side, "br": height - side}[position]
        left = {"c": (width - side) // 2, "tl": 0, "bl": 0, "tr": width - side, "br": width - side}[position]
        return {"top": top, "left": left, "height": side, "width": side}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _crop_resize(inpt, params, self.size)


class CenterSquareResize(v2.Transform):
    """The centre square of side int(min(H, W) * scale), resized to `size` x `size` (deterministic)."""

    def __init__(self, size: int, *, scale: float = 1.0):
        super().__init__()
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1]; got {scale}")
        self.size, self.scale = int(size), float(scale)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(next(i for i in flat_inputs if isinstance(i, torch.Tensor)))
        side = max(1, int(min(height, width) * self.scale))
        return {"top": (height - side) // 2, "left": (width - side) // 2, "height": side, "width": side}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _crop_resize(inpt, params, self.size)


class _Preset:
    def __init__(self, steps: list[v2.Transform], mean: Sequence[float], std: Sequence[float], layout: Layout):
        if layout not in ("TCHW", "CTHW"):
            raise ValueError(f"layout must be 'TCHW' or 'CTHW'; got {layout!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each (RGB), std > 0; got mean={mean}, std={std}")
        self.layout = layout
        self.pipeline = v2.Compose(steps)
        # normalise uint8 directly: (x / 255 - mean) / std == (x - 255 mean) * 1 / (255 std)
        self.shift = torch.tensor([255.0 * m for m in mean]).view(3, 1, 1, 1)
        self.factor = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1, 1)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, video: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 clip [T, C, H, W] (or [C, T, H, W] per `layout`) -> float [C, T, crop_size, crop_size]."""
        if video.ndim != 4:
            raise ValueError(f"expected a clip with 4 dimensions ({self.layout}); got shape {tuple(video.shape)}")
        if self.layout == "CTHW":
            video = video.transpose(0, 1)
        out = self._spatial(tv_tensors.Video(video), generator).as_subclass(torch.Tensor)
        # one copy to float [C, T, H, W], then in-place normalisation (uint8 crop/resize first: 4x less memory)
        out = out.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        return out.sub_(self.shift).mul_(self.factor)

    def _spatial(self, video: tv_tensors.Video, generator: torch.Generator | None) -> torch.Tensor:
        return self.pipeline(video)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline}, mean={self.mean}, std={self.std}, layout={self.layout!r})"


class TrainPreset(_Preset):
    """The paper's training augmentation: multiscale corner crop, horizontal flip, normalisation.

    `hflip` is the flip probability: keep 0.5 for appearance-defined sets (UCF-101, Kinetics), use 0 where left
    and right are part of the label (the built-in demo's clockwise / counterclockwise classes).
    """

    def __init__(
        self,
        *,
        crop_size: int,
        scales: Sequence[float] = PAPER_SCALES,
        positions: Sequence[str] = CORNERS,
        hflip: float = 0.5,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
        layout: Layout = "TCHW",
    ):
        self.crop = MultiScaleCornerCrop(crop_size, scales=scales, positions=positions)
        self.hflip = float(hflip)
        steps: list[v2.Transform] = [self.crop] + ([v2.RandomHorizontalFlip(p=hflip)] if hflip > 0 else [])
        super().__init__(steps, mean, std, layout)  # `pipeline` shows the steps; `_spatial` runs them

    def _spatial(self, video: tv_tensors.Video, generator: torch.Generator | None) -> torch.Tensor:
        # the steps by hand, so that every draw comes from `generator` (torchvision's v2 transforms take none)
        out = _crop_resize(video, self.crop.draw(*F.get_size(video), generator), self.crop.size)
        if self.hflip > 0 and float(torch.rand((), generator=generator)) < self.hflip:
            out = F.horizontal_flip(out)
        return out


class EvalPreset(_Preset):
    """Evaluation: the centre square (side min(H, W) x `scale`) resized to `crop_size`, then normalisation."""

    def __init__(
        self,
        *,
        crop_size: int,
        scale: float = 1.0,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
        layout: Layout = "TCHW",
    ):
        super().__init__([CenterSquareResize(crop_size, scale=scale)], mean, std, layout)
