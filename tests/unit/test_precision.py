"""precision.py: which convolutions run in bf16, decided layer by layer from what the kernels compute and how fast.
Wrong and slow kernels are injected, so that every path of the decision runs on every machine, whatever its CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from action3d import precision
from action3d.models import create_model

CLIP = (3, 8, 32, 32)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet10", n_classes=4, widen_factor=0.25, conv1_t_size=3)


def wrong_at(depth: int) -> precision.Kernel:
    """The real kernels, except that bf16's weight gradient comes out as noise for inputs `depth` frames deep
    (what torch 2.14's oneDNN does at 2 frames on AVX512-BF16 CPUs)."""

    def kernel(x, w, g, sig):
        y, gx, gw = precision.conv_forward_backward(x, w, g, sig)
        if x.dtype == torch.bfloat16 and sig[0][1] == depth:
            gw = torch.randn_like(gw) * 100
        return y, gx, gw

    return kernel


def seconds(bf16_factor: float):
    """A timer that says bf16 takes `bf16_factor` times fp32's time, whatever the machine."""

    def timer(sig, dtype, **_):
        return math.prod(sig[1]) * 1e-9 * (bf16_factor if dtype == torch.bfloat16 else 1.0)

    return timer


def test_signatures_cover_every_convolution_once_per_shape_and_leave_the_model_as_it_was(model):
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    signatures = precision.conv_signatures(model.train(), CLIP)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    assert sorted(name for names in signatures.values() for name in names) == sorted(convs)
    depths = {sig[0][1] for sig in signatures}  # frames deep at each layer: 8, then halved by the strides
    assert depths == {8, 4, 2, 1}
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_a_layer_whose_bf16_kernel_is_wrong_runs_in_fp32_and_the_rest_in_bf16(model):
    plan = precision.plan(model, CLIP, device="cpu", kernel=wrong_at(2), timer=seconds(0.5), native=True)
    two_deep = {name for d in plan.decisions if d.signature[0][1] == 2 for name in d.layers}
    assert two_deep and plan.fp32_layers == two_deep  # exactly the injected layers
    assert plan.autocast and all(d.speedup == pytest.approx(2.0) for d in plan.decisions if d.bf16)
    assert all(d.error > precision.TOLERANCE for d in plan.decisions if not d.bf16)
    assert all(d.error < 0.02 for d in plan.decisions if d.bf16)  # the real bf16 kernels: ~3e-3 of fp32
    line = plan.summary()
    assert line.startswith("bf16 for ") and "2.00x" in line and "wrong in bf16" in line
    assert all(d.layers[0] in line for d in plan.decisions if not d.bf16)  # each fp32 layer named, with why

    precision.apply(model, plan)
    assert {n for n, m in model.named_modules() if isinstance(m, precision.Float32Conv3d)} == two_deep
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.update({n: o.dtype}))
             for n, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(torch.randn(2, *CLIP))
    for hook in hooks:
        hook.remove()
    assert {n for n, dtype in outputs.items() if dtype == torch.float32} == two_deep  # autocast off in those alone
    assert set(outputs) - two_deep and all(outputs[n] == torch.bfloat16 for n in set(outputs) - two_deep)


def test_where_bf16_is_slower_every_layer_runs_in_fp32(model):
    plan = precision.plan(model, CLIP, device="cpu", timer=seconds(1.5), native=True)
    assert not plan.autocast and len(plan.fp32_layers) == sum(isinstance(m, nn.Conv3d) for m in model.modules())
    assert plan.summary().startswith("fp32 for every layer") and "not faster in bf16 (0.67x)" in plan.summary()


def test_without_native_bf16_nothing_is_measured_and_everything_is_fp32(model):
    def never(*_args, **_kwargs):
        raise AssertionError("an emulated bf16 kernel was run")

    plan = precision.plan(model, CLIP, device="cpu", kernel=never, timer=never, native=False)
    assert not plan.autocast and plan.decisions == ()
    assert plan.summary() == "fp32 for every layer: bf16 is emulated on this cpu (no native bf16), slower than fp32"


def test_layer_error_is_small_for_the_real_kernels_and_large_for_a_wrong_one(model):
    sig = next(iter(precision.conv_signatures(model, CLIP)))
    right = precision.layer_error(sig, torch.float32)
    assert max(right.values()) < 1e-5  # fp32 against itself
    wrong = precision.layer_error(sig, torch.bfloat16, kernel=wrong_at(sig[0][1]))
    assert wrong["grad_weight"] > 1 and wrong["output"] < precision.TOLERANCE
