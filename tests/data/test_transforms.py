"""Train and eval presets: shapes, layouts, one crop per clip, the paper's scales and positions, normalisation."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from action3d.data.transforms import KINETICS_MEAN, KINETICS_STD, EvalPreset, MultiScaleCornerCrop, TrainPreset


def _clip(t=4, h=30, w=40, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (t, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("crop_size", [16, 24])
@pytest.mark.parametrize("preset", [TrainPreset, EvalPreset])
def test_shapes_and_layouts(preset, crop_size):
    clip = _clip()
    out = preset(crop_size=crop_size)(clip)
    assert out.shape == (3, 4, crop_size, crop_size) and out.dtype == torch.float32 and out.is_contiguous()
    if preset is EvalPreset:  # [C, T, H, W] input gives the same result
        assert torch.equal(preset(crop_size=crop_size, layout="CTHW")(clip.transpose(0, 1)), out)


def test_every_frame_gets_the_same_crop():
    frame = _clip(t=1)
    clip = frame.repeat(6, 1, 1, 1)
    for seed in range(10):
        torch.manual_seed(seed)
        out = TrainPreset(crop_size=12)(clip)
        assert all(torch.equal(out[:, 0], out[:, t]) for t in range(1, 6))


def test_corner_crop_at_half_scale_is_the_top_left_quarter():
    clip = _clip(h=32, w=48)
    crop = MultiScaleCornerCrop(8, scales=(0.5,), positions=("tl",))
    expected = F.resize(clip[:, :, :16, :16], [8, 8], antialias=True)
    assert torch.equal(crop(clip), expected)
    centre = MultiScaleCornerCrop(32, scales=(1.0,), positions=("c",))(clip)
    assert torch.equal(centre, clip[:, :, :, 8:40])  # full height, centred, no resize needed


def test_the_paper_scales_and_all_five_positions_are_drawn():
    crop = MultiScaleCornerCrop(8)
    seen_sides, seen_corners = set(), set()
    torch.manual_seed(0)
    for _ in range(300):
        p = crop.make_params([_clip(h=64, w=96)])
        seen_sides.add(p["height"])
        seen_corners.add((p["top"], p["left"]))
    assert seen_sides == {64, 53, 45, 38, 32}  # int(64 * 2^(-k/4)) for k = 0..4
    assert (0, 0) in seen_corners and (0, 96 - 32) in seen_corners and (16, 32) in seen_corners  # centre of a 32 crop


def test_flip_probability_zero_never_mirrors():
    clip = _clip(h=20, w=20)
    preset = TrainPreset(crop_size=20, scales=(1.0,), positions=("c",), hflip=0.0)
    assert all(torch.equal(preset(clip), preset(clip)) for _ in range(5))
    flips = TrainPreset(crop_size=20, scales=(1.0,), positions=("c",), hflip=1.0)(clip)
    assert torch.allclose(flips, preset(clip).flip(-1))


def test_normalisation_uses_mean_and_std():
    clip = torch.full((2, 3, 10, 10), 200, dtype=torch.uint8)
    out = EvalPreset(crop_size=10)(clip)
    expected = torch.tensor([(200 / 255 - m) / s for m, s in zip(KINETICS_MEAN, KINETICS_STD)])
    assert torch.allclose(out[:, 0, 0, 0], expected, atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="positions"):
        MultiScaleCornerCrop(8, positions=("middle",))
    with pytest.raises(ValueError, match="layout"):
        EvalPreset(crop_size=8, layout="THWC")
    with pytest.raises(ValueError, match="4 dimensions"):
        EvalPreset(crop_size=8)(torch.zeros(3, 8, 8, dtype=torch.uint8))


def test_train_preset_draws_from_the_generator_it_is_given():
    clip, preset = _clip(h=32, w=48), TrainPreset(crop_size=8)
    outs = [preset(clip, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    again = preset(clip, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    assert torch.equal(again, outs[3])
    assert len({o.sum().item() for o in outs}) > 1  # and seeds differ in crop or flip
