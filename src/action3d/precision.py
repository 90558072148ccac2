"""Which convolutions train in bf16 on this device, decided by measurement: right and faster, or fp32.

bf16 autocast is only worth it where the device's bf16 kernels compute what fp32 computes and do it faster, and
neither holds everywhere:
- right: torch 2.14's oneDNN on an AVX512-BF16 CPU computes the bf16 weight gradient of a 3x3x3 Conv3d over a
  2-frame-deep input wrongly (relative error ~1 or inf: ResNet's layer3 at 16 frames); the forward pass is right.
- faster: a CPU without native bf16 (AVX2 only) emulates it, about 100x slower than fp32.

So before a stage trains in bf16, `plan` checks every distinct Conv3d of its model at the shapes the real clips
give it: forward, input gradient and weight gradient in bf16 against fp32 on random data (bf16 is within ~3e-3 of
fp32; a broken kernel is off by ~1 or inf), and the time of a forward + backward in each precision. A layer that
is wrong, or not faster, runs in fp32 (autocast off inside it: `apply`); the rest in bf16. When no layer gains,
the whole model trains in fp32. The check takes a few seconds; on a CPU without native bf16 it times nothing.

Imports torch alone: the GPU benchmark uses it on a machine with nothing else.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

TOLERANCE = 0.05  # relative error of a layer's bf16 result against fp32: ~3e-3 when right, ~1 or inf when not
TIMED_BATCH = 4  # clips per timed pass: the ratio of the two precisions, not the step time, is what is measured
TIMED_REPEATS = 3  # the best of these after a warm-up: other processes only ever slow a pass down

# A distinct convolution: (input shape without the batch, weight shape, stride, padding, dilation, groups).
Signature = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], int]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Signature], tuple[torch.Tensor, ...]]


def conv_signatures(model: nn.Module, clip: tuple[int, int, int, int]) -> dict[Signature, list[str]]:
    """Every distinct Conv3d of `model` at the shapes one [1, *clip] input gives it -> the layers of that shape."""
    found: dict[Signature, list[str]] = {}

    def remember(name: str):
        def hook(module: nn.Conv3d, inputs, _output) -> None:
            key = (tuple(inputs[0].shape[1:]), tuple(module.weight.shape), tuple(module.stride),
                   tuple(module.padding), tuple(module.dilation), module.groups)
            found.setdefault(key, []).append(name)
        return hook

    hooks = [m.register_forward_hook(remember(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    was_training = model.training
    try:
        model.eval()  # no BatchNorm statistics move
        with torch.no_grad():
            model(torch.zeros(1, *clip, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return found


def conv_forward_backward(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, sig: Signature) -> tuple[torch.Tensor, ...]:
    """One convolution's output, input gradient and weight gradient for output gradient `g`: the kernels a
    training step runs for that layer, in the dtype and memory layout of the tensors given."""
    _, _, stride, padding, dilation, groups = sig
    y = nn.functional.conv3d(x, w, None, stride, padding, dilation, groups)
    gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, list(stride), list(padding), list(dilation), False,
                                                     [0, 0, 0], groups, [True, True, False])
    return y, gx, gw


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    err = ((value.float() - reference).norm() / reference.norm().clamp_min(1e-12)).item()
    return err if math.isfinite(err) else math.inf


def _tensors(sig: Signature, batch: int, device: torch.device, gen: torch.Generator):
    shape, wshape = sig[0], sig[1]
    x = torch.randn((batch, *shape), generator=gen).to(device)
    w = (torch.randn(wshape, generator=gen) / math.prod(wshape[1:]) ** 0.5).to(device)
    with torch.no_grad():
        y = nn.functional.conv3d(x, w, None, *sig[2:])
    return x, w, torch.randn(y.shape, generator=gen).to(device)


def _fp32_reference(fn, device: torch.device):
    """`fn()` in true fp32: TF32 off on CUDA (its fp32 convolutions use TF32 tensor cores by default)."""
    if device.type != "cuda":
        return fn()
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return fn()
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def layer_error(sig: Signature, dtype: torch.dtype, *, device: torch.device | str = "cpu", batch: int = 1,
                channels_last: bool = True, kernel: Kernel = conv_forward_backward, seed: int = 0) -> dict[str, float]:
    """Relative error of a convolution's output, input gradient and weight gradient computed in `dtype` (and
    layout) against true fp32, on random data of its real shapes."""
    device = torch.device(device)
    x, w, g = _tensors(sig, batch, device, torch.Generator().manual_seed(seed))
    reference = _fp32_reference(lambda: conv_forward_backward(x, w, g, sig), device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    got = kernel(*(t.to(dtype).to(memory_format=fmt) for t in (x, w, g)), sig)
    return {part: _relative_error(a, b) for part, a, b in zip(("output", "grad_input", "grad_weight"), got, reference)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer(sig: Signature, dtype: torch.dtype, *, device: torch.device, channels_last: bool,
               kernel: Kernel = conv_forward_backward, repeats: int = TIMED_REPEATS) -> float:
    """Seconds of one forward + backward of the convolution in `dtype`, at TIMED_BATCH clips: the best of
    `repeats` after one warm-up."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x, w, g = (t.to(dtype).to(memory_format=fmt) for t in _tensors(sig, TIMED_BATCH, device, torch.Generator()))
    best = math.inf
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        kernel(x, w, g, sig)
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def native_bf16(device: torch.device | str) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX.
    Elsewhere bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


@dataclass(frozen=True)
class LayerDecision:
    layers: tuple[str, ...]  # the Conv3d modules of this signature
    signature: Signature
    error: float  # worst relative error of output, input and weight gradient in bf16
    speedup: float | None  # fp32 seconds / bf16 seconds of a forward + backward; None when not timed

    @property
    def bf16(self) -> bool:
        return self.error <= TOLERANCE and self.speedup is not None and self.speedup > 1.0

    @property
    def why(self) -> str:
        if not self.error <= TOLERANCE:
            return f"wrong in bf16 (relative error {self.error:.3g})"
        if self.speedup is None:
            return "bf16 not timed"
        return f"{self.speedup:.2f}x in bf16" if self.bf16 else f"not faster in bf16 ({self.speedup:.2f}x)"


@dataclass(frozen=True)
class Plan:
    """What `plan` decided: each distinct convolution in bf16 or fp32, and why."""

    decisions: tuple[LayerDecision, ...] = ()
    note: str = ""  # a reason that holds for the whole model (bf16 not asked for, emulated, ...)
    fp32_layers: frozenset[str] = field(default_factory=frozenset)

    @property
    def autocast(self) -> bool:
        """Whether any layer runs in bf16 (then the step runs under bf16 autocast, the fp32 layers excepted)."""
        return any(d.bf16 for d in self.decisions)

    def summary(self) -> str:
        """One line: which layers run in which precision, and why."""
        fast = [d for d in self.decisions if d.bf16]
        slow = [f"{_short(d.layers)} ({d.why})" for d in self.decisions if not d.bf16]
        if not fast:
            return "fp32 for every layer: " + (self.note or "; ".join(slow) or "no convolution")
        speedups = sorted(d.speedup for d in fast)
        line = (f"bf16 for {sum(len(d.layers) for d in fast)} convolutions ({speedups[0]:.2f}x-{speedups[-1]:.2f}x "
                "faster than fp32, right)")
        return line + ("; fp32 for " + ", ".join(slow) if slow else "")


def _short(layers: tuple[str, ...]) -> str:
    return layers[0] if len(layers) == 1 else f"{layers[0]} and {len(layers) - 1} more"


def plan(model: nn.Module, clip: tuple[int, int, int, int], *, device: torch.device | str, channels_last: bool = True,
         kernel: Kernel | None = None, timer: Callable[..., float] | None = None, native: bool | None = None) -> Plan:
    """Decide, layer by layer, where bf16 is right and faster on `device` for clips of shape `clip` (C, T, H, W).

    `kernel` and `timer` are what is measured (default: this module's conv_forward_backward and time_layer; tests
    inject a wrong or a slow one); `native` overrides the hardware probe. The model must be on `device`."""
    device = torch.device(device)
    kernel, timer = kernel or conv_forward_backward, timer or time_layer
    if not (native_bf16(device) if native is None else native):
        return Plan(note=f"bf16 is emulated on this {device.type} (no native bf16), slower than fp32")
    decisions = []
    for sig, layers in conv_signatures(model, clip).items():
        error = max(layer_error(sig, torch.bfloat16, device=device, channels_last=channels_last, kernel=kernel).values())
        speedup = None
        if error <= TOLERANCE:
            fp32 = timer(sig, torch.float32, device=device, channels_last=channels_last, kernel=kernel)
            bf16 = timer(sig, torch.bfloat16, device=device, channels_last=channels_last, kernel=kernel)
            speedup = fp32 / bf16 if bf16 > 0 else math.inf
        decisions.append(LayerDecision(tuple(layers), sig, error, speedup))
    return Plan(tuple(decisions), "", frozenset(name for d in decisions if not d.bf16 for name in d.layers))


class Float32Conv3d(nn.Conv3d):
    """A Conv3d that computes in fp32 under bf16 autocast: what `apply` turns a layer into (same weights, same
    state_dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def apply(model: nn.Module, decided: Plan) -> nn.Module:
    """Make the layers `decided` keeps in fp32 compute in fp32 under autocast (in place); returns `model`."""
    for name, module in model.named_modules():
        if type(module) is nn.Conv3d and name in decided.fp32_layers:
            module.__class__ = Float32Conv3d
    return model
