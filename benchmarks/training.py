"""Training-step throughput: the reference's recipe vs our engine's, per model, side by side in one run.

One training step = forward, loss, backward, optimiser step, zero_grad, on a batch that is already on the device
(no data loading: see end_to_end.py for that). The recipes of a model run interleaved, repeat by repeat (the order
alternates), from the same initial weights on the same batches:

  reference  as kenshohara/3D-ResNets-PyTorch trains (train.py / main.py): fp32, contiguous memory,
             torch.optim.SGD(momentum 0.9, dampening 0.9, weight decay 1e-3, no Nesterov) with the plain per-tensor
             loop (foreach=False), eager. Its loop is written here: forward, loss, accuracy and loss.item() (the
             reference logs both every step, so it syncs every step), zero_grad, backward, step. Its DataParallel
             wrapper (a scatter per step even on one GPU) is left out, which flatters the reference slightly.
  ours       our engine's own code path: `engine.prepare_model` (channels_last_3d; torch.compile with --compile,
             the default on CUDA), `engine.build_optimizer` (the same SGD; foreach/fused left to torch's default,
             which picks foreach on CUDA and the plain loop on the CPU) and `engine.train_one_epoch` with bf16
             autocast, fed an in-memory "loader": a list of batch dicts already on the device, contiguous as our
             loaders yield them (the engine converts them to channels_last_3d itself, a cost that is counted).
             train_one_epoch does per step what the reference loop does (loss.item(), an accuracy count) plus a
             disabled tqdm: no unfair overhead either way. Its clips/s is clips / wall time of the call.
  ours-fp32  the same without autocast (channels_last_3d alone): timed by default on the CPU; `--recipes` chooses.
  ours, per-layer precision   what a stage asked for bf16 trains with: `action3d.precision.plan` measures each
             distinct convolution at its real shapes (bf16 against fp32: right? faster?) and keeps in fp32 the
             layers where bf16 is wrong or slower; on a device without native bf16 the whole model stays fp32.
             The JSON and the table say which layers run in which precision, and why.
  ours, params.yaml   the demo's model only: the engine with the pretrain section's bf16/channels_last/compile
             knobs, when they differ from the above.

Both sides run on torch's current defaults, so on a GPU the reference's fp32 convolutions use TF32 tensor cores
(cudnn.allow_tf32 is on by default; the 2018 reference ran true fp32): `--no-reference-tf32` turns TF32 off for
the reference's steps. cudnn.benchmark is on for both on CUDA, as the reference's main.py sets it.

Per model: clips/s per recipe (median of `--repeats` timed runs of `--steps` steps, each from the initial weights,
after `--warmup` steps that include compilation), ours / reference, FLOPs per step (forward FLOPs from
torch.utils.flop_counter on one forward pass, x3 for forward + backward; the JSON also has the count of a real
forward + backward pass, lower: the first convolution needs no input gradient), achieved GFLOP/s, and MFU against a
"practical peak" measured in the same run: the best rate of a large square matmul in fp32 (and TF32 on CUDA) and
bf16. That peak is what this machine's BLAS reaches, not a datasheet number; convolutions may beat it.

Speed means nothing if the fast path computes something else, so each recipe's convolutions are also checked, by
the same layer check the stages use (`precision.layer_error`): every distinct Conv3d of the model at the batch's
shapes, in the precision and layout the recipe computes it in, forward, input gradient and weight gradient against
fp32 on random data (relative error <= 0.05; bf16 gives ~3e-3). A failure is printed and recorded under
"kernel_check" ("wrong": which layers, which part), and a goal counts as met only when the check passes. On an
AVX512-BF16 CPU (torch 2.14.1, oneDNN 3.12) bf16 weight gradients of a 3x3x3 Conv3d whose input is 2 frames deep
(ResNet's layer3 at 16 frames) come out wrong or infinite. A non-finite loss stops our engine's epoch
(NonFiniteLossError): that run is counted ("nonfinite_losses") and redone from the initial weights, at most twice,
after which it is left out of the median. The bf16 matmul peak is measured only where bf16 is native (elsewhere
it is emulated, minutes for one large matmul, and marked so).

Imports torch and action3d.models at module level and nothing else, so it runs on a machine with torch alone;
the engine (which needs numpy and tqdm) is imported when the run starts, and if that fails an inline copy of its
step (same settings) stands in and the JSON says so ("engine": "inline: ...").

    python benchmarks/training.py                          # resnet18, resnet50, demo on cuda if present else cpu
    python benchmarks/training.py --models resnet18 --steps 4 --repeats 5
    python benchmarks/training.py --device cuda --models resnet18 resnet50 resnext101   # compile on by default
    python benchmarks/training.py --quick                  # the real clip sizes, 1 step x 3 repeats: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from action3d import precision
from action3d.models import create_model, is_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO = "demo"  # the demo's model, read from params.yaml
GOALS = {"cpu": 1.4, "cuda": 2.0}  # ours / reference clips/s for resnet18 at 16x112x112, where bf16 is native
NO_SLOWER = 0.9  # where bf16 is emulated: per-layer precision / ours-fp32 at least this (asking for bf16 costs nothing)
# batches per device (the demo takes its pretrain batch from params.yaml); --batch overrides them all
BATCH = {"cpu": {}, "cuda": {"resnext101": 32}}
DEFAULT_BATCH = {"cpu": 8, "cuda": 64}
# steps, warmup, repeats per device: CPU steps take seconds, GPU steps tens of milliseconds
SCHEDULE = {"cpu": (5, 2, 5), "cuda": (20, 5, 5)}
RETRIES = 2  # timed runs retried (from the initial weights) after a non-finite loss, per recipe and repeat


@dataclass(frozen=True)
class Recipe:
    name: str
    engine: bool  # our engine's functions (else the reference's loop, written below)
    bf16: bool
    channels_last: bool
    compile: bool
    per_layer: bool = False  # bf16 only where precision.plan finds it right and faster (else every layer in bf16)


@dataclass
class Case:
    """One model to time: its name, how to build it, its clip and batch, and the recipes to compare."""

    name: str
    arch: str
    kwargs: dict
    frames: int
    crop: int
    batch: int
    recipes: list[Recipe]


# --- the two recipes ------------------------------------------------------------------------------------------------


def reference_steps(model: nn.Module, criterion, optimizer, batches) -> None:
    """The reference's train_epoch, minus its logging: one sync per step for the logged loss and accuracy."""
    model.train()
    for batch in batches:
        video, label = batch["video"], batch["label"]
        logits = model(video)
        loss = criterion(logits, label)
        _accuracy = (logits.argmax(dim=1) == label).float().mean().item()
        _loss = loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


class InlineEngine:
    """Stands in for action3d.engine where it cannot be imported (no numpy or tqdm): the same model preparation,
    optimiser and step as engine.prepare_model / build_optimizer / train_one_epoch, without the metrics."""

    @staticmethod
    def prepare_model(model, device, *, channels_last=False, compile=False):
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        return torch.compile(model) if compile else model

    @staticmethod
    def build_optimizer(model, *, lr):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.9, weight_decay=1e-3, nesterov=False)

    @staticmethod
    def train_one_epoch(model, criterion, optimizer, batches, device, epoch, *, autocast_dtype=None,
                        channels_last=False, progress=False):
        model.train()
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        for batch in batches:
            video = batch["video"].to(device, non_blocking=True, memory_format=fmt)
            label = batch["label"].to(device, non_blocking=True)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast_dtype is not None):
                logits = model(video)
                loss = criterion(logits, label)
            _loss = loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _correct = int((logits.argmax(dim=1) == label).sum())


def load_engine():
    """(our engine module, how it was loaded)."""
    try:
        from action3d import engine
    except ImportError as err:  # torch alone: no numpy or tqdm
        print(f"action3d.engine does not import ({err}): timing an inline copy of its step", file=sys.stderr)
        return InlineEngine, f"inline: {err}"
    return engine, "action3d.engine"


class Runner:
    """A model set up for one recipe: `run(batches)` trains one pass over them, `reset()` restores the initial
    weights and optimiser state."""

    def __init__(self, recipe: Recipe, base: nn.Module, device: torch.device, engine, *, lr: float,
                 reference_tf32: bool, clip: tuple[int, int, int, int]):
        self.recipe, self.device, self.engine, self.reference_tf32 = recipe, device, engine, reference_tf32
        self.criterion = nn.CrossEntropyLoss()
        model = copy.deepcopy(base)
        self.bf16 = recipe.bf16
        self.plan = None
        if recipe.per_layer:  # as the training stage does it: measured at the real clip, before compiling
            started = time.perf_counter()
            self.plan = precision.plan(model.to(device), clip, device=device, channels_last=recipe.channels_last)
            precision.apply(model, self.plan)
            self.plan_s = time.perf_counter() - started
            self.bf16 = self.plan.autocast
        if recipe.engine:
            self.model = engine.prepare_model(model, device, channels_last=recipe.channels_last,
                                              compile=recipe.compile)
            self.optimizer = engine.build_optimizer(self.model, lr=lr)
        else:
            self.model = model.to(device)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, dampening=0.9,
                                             weight_decay=1e-3, nesterov=False, foreach=False)
        self.epoch = 0
        self.initial = copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict())

    def reset(self) -> None:
        """Back to the initial weights, BatchNorm statistics and (empty) momentum: every timed run starts alike."""
        self.model.load_state_dict(self.initial[0])
        self.optimizer.load_state_dict(self.initial[1])

    def optimizer_impl(self) -> str:
        d = self.optimizer.defaults
        if d.get("fused"):
            return "fused"
        foreach = d.get("foreach")
        if foreach is None:  # torch's default: foreach when every parameter is on CUDA
            foreach = self.device.type == "cuda"
        return "foreach" if foreach else "for-loop"

    def layer_dtype(self, layers: list[str]) -> torch.dtype:
        """The precision this recipe computes a convolution of these layers in."""
        if not self.bf16 or (self.plan is not None and set(layers) <= self.plan.fp32_layers):
            return torch.float32
        return torch.bfloat16

    def run(self, batches) -> None:
        if self.recipe.engine:
            self.epoch += 1
            self.engine.train_one_epoch(
                self.model, self.criterion, self.optimizer, batches, self.device, self.epoch,
                autocast_dtype=torch.bfloat16 if self.bf16 else None, channels_last=self.recipe.channels_last,
                progress=False,
            )  # fmt: skip
        else:
            with tf32(self.device, None if self.reference_tf32 else False):
                reference_steps(self.model, self.criterion, self.optimizer, batches)


class tf32:
    """Within the block, TF32 for cuDNN convolutions and matmuls on (True), off (False) or as it is (None)."""

    def __init__(self, device: torch.device, allow: bool | None):
        self.allow = allow if device.type == "cuda" else None

    def __enter__(self):
        if self.allow is not None:
            with warnings.catch_warnings():  # torch >= 2.9 prefers fp32_precision; the old flags still work
                warnings.simplefilter("ignore")
                self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.allow

    def __exit__(self, *exc):
        if self.allow is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


# --- measuring ------------------------------------------------------------------------------------------------------


def run_guarded(runner: Runner, batches, nonfinite: dict[str, int], name: str) -> float:
    """Seconds of `runner.run(batches)`. On a non-finite loss (the engine stops there: NonFiniteLossError is a
    FloatingPointError) count it, restore the initial weights and time the batches again, at most RETRIES times."""
    for attempt in range(RETRIES + 1):
        try:
            return timed(lambda: runner.run(batches), runner.device)
        except FloatingPointError as err:
            nonfinite[name] += 1
            print(f"  {name}: {err.__class__.__name__} ({str(err).split(':')[0]}): restarting from the initial "
                  "weights", flush=True)
            if attempt == RETRIES:
                return math.nan  # left out of the median
            runner.reset()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def forward_flops_per_clip(model: nn.Module, frames: int, crop: int, device: torch.device) -> tuple[float, float]:
    """FLOPs of one forward pass of one clip (a multiply-add counts 2), by torch's FlopCounterMode, and those of a
    forward + backward pass, counted the same way."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).to(device).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, frames, crop, crop, device=device))
    with FlopCounterMode(display=False) as train_counter:
        model(torch.zeros(1, 3, frames, crop, crop, device=device)).sum().backward()  # eval: batch 1 is fine
    return float(counter.get_total_flops()), float(train_counter.get_total_flops())


def check_convolutions(convs: dict, batch: int, runner: Runner, device: torch.device) -> dict:
    """Each distinct convolution of the model, at the batch's shapes, in the precision and memory layout the recipe
    computes it in, against true fp32: forward, input gradient and weight gradient (`precision.layer_error`)."""
    recipe, worst, wrong, dtypes = runner.recipe, 0.0, [], set()
    for sig, names in convs.items():
        dtype = runner.layer_dtype(names)
        dtypes.add(str(dtype).replace("torch.", ""))
        with tf32(device, None if recipe.engine or runner.reference_tf32 else False):
            errors = precision.layer_error(sig, dtype, device=device, batch=batch, channels_last=recipe.channels_last)
        worst = max(worst, *errors.values())
        shape, wshape, stride, padding, _, groups = sig
        for part, err in errors.items():
            if not err <= precision.TOLERANCE:
                wrong.append({"layers": names, "input": [batch, *shape], "weight": list(wshape), "stride": stride,
                              "padding": padding, "groups": groups, "part": part, "rel_err": _json_float(err)})
    return {"ok": not wrong, "max_rel_err": _json_float(worst), "tolerance": precision.TOLERANCE,
            "convolutions": len(convs), "dtype": "+".join(sorted(dtypes)), "channels_last": recipe.channels_last,
            "wrong": wrong}


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no inf


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best GFLOP/s of `repeats` timed n x n x n matmuls: the practical peak of this device's BLAS for `dtype`
    (the best, not the median: contention from other processes only ever slows it)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    inner = 10 if device.type == "cuda" else 1

    def work():
        for _ in range(inner):
            torch.mm(a, b)

    work()  # warm-up (kernel selection)
    rates = [2 * n**3 * inner / timed(work, device) / 1e9 for _ in range(repeats)]
    return max(rates)


def practical_peaks(device: torch.device, n: int) -> dict[str, float]:
    """GFLOP/s of a large matmul in fp32 (IEEE), TF32 (CUDA only) and bf16 (only where bf16 is native: emulated,
    one such matmul takes minutes)."""
    peaks = {}
    with tf32(device, False):
        peaks["fp32"] = matmul_rate(device, torch.float32, n)
    if device.type == "cuda":
        with tf32(device, True):
            peaks["tf32"] = matmul_rate(device, torch.float32, n)
    if precision.native_bf16(device):
        peaks["bf16"] = matmul_rate(device, torch.bfloat16, n)
    return peaks


def peak_for(runner: Runner, device: torch.device, peaks: dict[str, float], reference_tf32: bool) -> str:
    """Which measured peak a recipe's MFU is taken against: its compute dtype (bf16 when any layer runs in it)."""
    recipe = runner.recipe
    if runner.bf16:
        return "bf16"
    if device.type == "cuda" and (reference_tf32 or recipe.engine) and cudnn_tf32():
        return "tf32"
    return "fp32"


def cudnn_tf32() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.backends.cudnn.allow_tf32)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_batches(case: Case, n_classes: int, count: int, device: torch.device, seed: int) -> list[dict]:
    """`count` distinct batches on the device, contiguous float32, as our loaders yield them."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, 3, case.frames, case.crop, case.crop)
    return [{"video": torch.randn(shape, generator=gen).to(device),
             "label": torch.randint(n_classes, (case.batch,), generator=gen).to(device)} for _ in range(count)]


def measure(case: Case, args, device: torch.device, engine, peaks: dict[str, float]) -> dict:
    torch.manual_seed(args.seed)
    base = create_model(case.arch, **case.kwargs)
    n_classes = case.kwargs["n_classes"]
    flops, train_flops = forward_flops_per_clip(base, case.frames, case.crop, device)
    clip = (3, case.frames, case.crop, case.crop)
    convs = precision.conv_signatures(copy.deepcopy(base).to(device), clip)
    runners = {r.name: Runner(r, base, device, engine, lr=args.lr, reference_tf32=args.reference_tf32, clip=clip)
               for r in case.recipes}
    for runner in runners.values():
        if runner.plan is not None:
            print(f"  {case.name}: {runner.recipe.name}: {runner.plan.summary()} (decided in {runner.plan_s:.1f} s)",
                  flush=True)
    del base
    pool = make_batches(case, n_classes, min(args.steps, 4), device, args.seed)
    steps = [pool[i % len(pool)] for i in range(args.steps)]
    warm = [pool[i % len(pool)] for i in range(args.warmup)]

    warmup_s, nonfinite = {}, {name: 0 for name in runners}
    for name, runner in runners.items():
        warmup_s[name] = run_guarded(runner, warm, nonfinite, name) if warm else 0.0
        print(f"  {case.name}: {name} warmed up in {warmup_s[name]:.1f} s", flush=True)
    kernels = {name: check_convolutions(convs, case.batch, runner, device) for name, runner in runners.items()}
    for name, check in kernels.items():
        if not check["ok"]:
            first = check["wrong"][0]
            print(f"  {case.name}: {name}: {len(check['wrong'])} convolution result(s) WRONG against fp32, e.g. "
                  f"{first['part']} of {first['layers'][0]} (input {first['input']}): relative error "
                  f"{first['rel_err']}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    memory: dict[str, float] = {}
    for rep in range(args.repeats):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            runners[name].reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(run_guarded(runners[name], steps, nonfinite, name))
            if device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated(device) / 2**30
        shown = ", ".join(f"{n} {case.batch * args.steps / times[n][-1]:.2f}" for n in runners)
        print(f"  {case.name}: repeat {rep + 1}/{args.repeats}: clips/s {shown}", flush=True)

    clips = case.batch * args.steps
    step_flops = 3 * flops * case.batch
    recipes = {}
    for recipe in case.recipes:
        rates = [clips / t for t in times[recipe.name] if math.isfinite(t)]
        rate = statistics.median(rates) if rates else math.nan
        achieved = step_flops * rate / case.batch / 1e9
        runner = runners[recipe.name]
        peak = peak_for(runner, device, peaks, args.reference_tf32)
        recipes[recipe.name] = {
            "clips_per_s": rate,
            "repeats": rates,
            "step_ms": 1e3 * case.batch / rate,
            "achieved_gflops": achieved,
            "mfu": achieved / peaks[peak] if peaks.get(peak) else None,
            "mfu_peak": peak if peak in peaks else f"{peak} (emulated: not measured)",
            "bf16": runner.bf16,
            **({"precision": runner.plan.summary(), "precision_decided_s": runner.plan_s,
                "fp32_layers": sorted(runner.plan.fp32_layers)} if runner.plan is not None else {}),
            "channels_last": recipe.channels_last,
            "compile": recipe.compile,
            "optimizer": runners[recipe.name].optimizer_impl(),
            "code": "engine.train_one_epoch" if recipe.engine else "reference loop (this file)",
            "warmup_s": warmup_s[recipe.name],
            "nonfinite_losses": nonfinite[recipe.name],
            "kernel_check": kernels[recipe.name],
            **({"max_memory_gib": memory[recipe.name]} if recipe.name in memory else {}),
        }
    reference = recipes["reference"]["clips_per_s"]  # (nan, in JSON NaN, only if every run of a recipe failed)
    result = {
        "arch": case.arch,
        "kwargs": case.kwargs,
        "batch": case.batch,
        "clip": [3, case.frames, case.crop, case.crop],
        "forward_gflops_per_clip": flops / 1e9,
        "gflops_per_step": step_flops / 1e9,
        # what autograd really computes: less than 3x forward (no input gradient for the first convolution)
        "counted_train_gflops_per_step": train_flops * case.batch / 1e9,
        "recipes": recipes,
        "ratios": {name: r["clips_per_s"] / reference for name, r in recipes.items() if name != "reference"},
    }
    del runners, pool, steps, warm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if any(r.compile for r in case.recipes):
        torch._dynamo.reset()  # drop the compiled graphs of this model
    return result


# --- cases ----------------------------------------------------------------------------------------------------------


def demo_case(args, device: torch.device, ours: list[Recipe]) -> Case:
    """The demo's model, clip and pretrain batch from params.yaml (needs pydantic and yaml: action3d.config)."""
    try:
        from action3d.config import load_params
    except ImportError as err:
        raise SystemExit(f"--models {DEMO} reads params.yaml through action3d.config, which needs {err.name or err}: "
                         "install the project's dependencies or leave the demo out") from None
    p = load_params(args.params)
    t = p.scratch.pretrain
    knobs = Recipe("ours, params.yaml", engine=True, bf16=t.bf16, channels_last=t.channels_last, compile=t.compile)
    recipes = [reference_recipe(), *ours]
    if all((knobs.bf16, knobs.channels_last, knobs.compile) != (r.bf16, r.channels_last, r.compile) for r in ours):
        recipes.append(knobs)
    kwargs = {"n_classes": (p.synth.sets.pretrain.classes if p.synth.sets.pretrain else 400), **p.model.kwargs}
    frames, crop = p.clip.frames, p.clip.crop_size
    batch = args.batch or t.batch_size
    return Case(DEMO, p.model.name, kwargs, frames, crop, batch, recipes)


def reference_recipe() -> Recipe:
    return Recipe("reference", engine=False, bf16=False, channels_last=False, compile=False)


def our_recipes(args) -> list[Recipe]:
    """"ours" (bf16 + channels_last_3d), "ours-fp32" (channels_last_3d alone) and "ours-per-layer" (bf16 where
    precision.plan finds it right and faster), those --recipes asks for."""
    made = {"ours": Recipe("ours", engine=True, bf16=True, channels_last=True, compile=args.compile),
            "ours-fp32": Recipe("ours-fp32", engine=True, bf16=False, channels_last=True, compile=args.compile),
            "ours-per-layer": Recipe("ours-per-layer", engine=True, bf16=True, channels_last=True,
                                     compile=args.compile, per_layer=True)}
    return [made[name] for name in args.recipes if name in made]


def build_cases(args, device: torch.device) -> list[Case]:
    ours = our_recipes(args)
    cases = []
    for name in args.models:
        if name == DEMO:
            cases.append(demo_case(args, device, ours))
            continue
        if not is_model(name):
            raise SystemExit(f"unknown model {name!r}: a name of `action3d models` or {DEMO!r}")
        batch = args.batch or BATCH[device.type].get(name, DEFAULT_BATCH[device.type])
        cases.append(Case(name, name, {"n_classes": 400}, args.frames, args.crop, batch, [reference_recipe(), *ours]))
    return cases


def write_json(path: Path, data: dict) -> None:
    """All or nothing, in the order written (action3d.atomic's write_json sorts the keys)."""
    from action3d.atomic import write_atomic_text

    write_atomic_text(path, json.dumps(data, indent=2) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", DEMO],
                    help=f"registry names, or {DEMO!r} for params.yaml's model at its clip size")
    ap.add_argument("--batch", type=int, default=None, help="for every model (default: per device and model)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default: cpu 5, cuda 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included "
                                                              "(default: cpu 2, cuda 5)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per recipe, interleaved (default 5)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile in our recipe (default: on for cuda, off for cpu, where it compiles slowly)")
    ap.add_argument("--reference-tf32", action=argparse.BooleanOptionalAction, default=True,
                    help="leave TF32 as torch sets it for the reference's fp32 steps on CUDA (default); "
                         "--no-reference-tf32: true fp32, as in 2018")
    ap.add_argument("--recipes", nargs="+", choices=["ours", "ours-fp32", "ours-per-layer"], default=None,
                    help="ours to time besides the reference (default: cpu all three, cuda ours: compiling a "
                         "second variant costs GPU minutes)")
    ap.add_argument("--lr", type=float, default=0.01, help="same for both (random data: kept small, no NaN)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (cpu 4096, cuda 8192)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help=f"for --models {DEMO}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the real clips, 1 step x 3 repeats: a smoke test")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON (default: benchmarks/results/training_<cpu-avx512-bf16|cpu-avx2|cuda>.json)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        torch.device(args.device)
    kind = device.type
    if kind not in GOALS:
        raise SystemExit(f"--device {args.device}: cpu or cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, warmup, repeats = (1, 1, 3) if args.quick else SCHEDULE[kind]
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = args.repeats or repeats
    if args.compile is None:
        args.compile = kind == "cuda"
    if args.recipes is None:
        # on a CPU without native bf16, "ours" (bf16 everywhere) is emulated: 10x slower and minutes per model
        args.recipes = ["ours"] if kind == "cuda" else ["ours", "ours-fp32", "ours-per-layer"] if \
            precision.native_bf16(device) else ["ours-fp32", "ours-per-layer"]
    peak_size = args.peak_size or (1024 if args.quick else 8192 if kind == "cuda" else 4096)
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True  # both recipes: the reference's main.py sets it too
    out = args.out or HERE / "results" / f"training_{result_kind(device)}.json"

    engine, engine_source = load_engine()
    cases = build_cases(args, device)
    started = time.perf_counter()
    print(f"measuring the practical matmul peak ({peak_size}^3) ...", flush=True)
    peaks = practical_peaks(device, peak_size)
    print("  " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)

    results: dict[str, dict] = {}
    setup = {
        "device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
        "cuda": torch.version.cuda if kind == "cuda" else None,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "compile": args.compile,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if kind == "cuda" else None,
        "cudnn_tf32": cudnn_tf32() if kind == "cuda" else None, "reference_tf32": args.reference_tf32,
        "lr": args.lr, "quick": args.quick, "engine": engine_source, "peak_matmul_size": peak_size,
        "models": args.models, "native_bf16": precision.native_bf16(device), "cpu_flags": cpu_flags(device),
    }
    for case in cases:
        print(f"{case.name}: batch {case.batch} x 3 x {case.frames} x {case.crop} x {case.crop}", flush=True)
        results[case.name] = measure(case, args, device, engine, peaks)
        # written after every model: a run cut short (a timeout) keeps what it measured
        report = make_report(setup, peaks, results, kind, complete=len(results) == len(cases),
                             seconds=time.perf_counter() - started)
        write_json(out, report)
    print()
    print(markdown_table(report))
    print(f"\n(JSON: {out})")
    return report


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def cpu_flags(device: torch.device) -> list[str]:
    """The CPU's vector extensions that matter here (AVX2, AVX-512 and its BF16, AMX), from /proc/cpuinfo."""
    if device.type != "cpu":
        return []
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def result_kind(device: torch.device) -> str:
    """The JSON's name: one file per machine kind, since the two CPU kinds differ 2-4x and in what bf16 does
    (`cpu-avx512-bf16`, `cpu-avx2`, `cpu-other`; `cuda`), so a run on one never overwrites the other's."""
    if device.type != "cpu":
        return device.type
    flags = set(cpu_flags(device))
    return "cpu-avx512-bf16" if "avx512_bf16" in flags else "cpu-avx2" if "avx2" in flags else "cpu-other"


def cpu_kind() -> str:
    """This machine's CPU and the vector extensions that decide its speeds: every benchmark's JSON names it."""
    cpu = torch.device("cpu")
    return f"{device_name(cpu)} ({', '.join(cpu_flags(cpu)) or 'no AVX2'})"


def make_report(setup: dict, peaks: dict, results: dict, kind: str, *, complete: bool, seconds: float) -> dict:
    """The JSON: setup, peaks, per-model results and the goal: where bf16 is native, the per-layer recipe (or, on
    a GPU, ours) >= GOALS x the reference for resnet18 at 16x112x112 with every convolution right; where it is
    emulated, asking for bf16 (per-layer) trains no slower than fp32 (>= NO_SLOWER x ours-fp32)."""
    goal = None
    r18 = results.get("resnet18")
    recipe = "ours" if kind == "cuda" else "ours-per-layer"
    if r18 and r18["clip"] == [3, 16, 112, 112] and recipe in r18["ratios"]:
        ratio, correct = r18["ratios"][recipe], r18["recipes"][recipe]["kernel_check"]["ok"]
        if setup["native_bf16"]:
            goal = {"model": "resnet18", "recipe": recipe, "against": "reference", "target_ratio": GOALS[kind],
                    "ratio": ratio}
        elif "ours-fp32" in r18["recipes"]:
            fp32 = r18["recipes"]["ours-fp32"]["clips_per_s"]
            goal = {"model": "resnet18", "recipe": recipe, "against": "ours-fp32", "target_ratio": NO_SLOWER,
                    "ratio": r18["recipes"][recipe]["clips_per_s"] / fp32}
        if goal:
            goal.update(clip=r18["clip"], fast_enough=goal["ratio"] >= goal["target_ratio"], kernels_correct=correct,
                        met=goal["ratio"] >= goal["target_ratio"] and correct)
    return {"setup": {**setup, "seconds": seconds, "complete": complete}, "practical_peak_gflops": peaks,
            "results": results, "goal": goal}


def markdown_table(report: dict) -> str:
    s = report["setup"]
    rows = ["| model | batch | clip | recipe | clips/s | x reference | GFLOP/step | GFLOP/s | MFU | optimizer | "
            "convolutions vs fp32 |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, r in report["results"].items():
        clip = "x".join(str(d) for d in r["clip"][1:])
        for recipe, m in r["recipes"].items():
            ratio = r["ratios"].get(recipe, 1.0)
            mfu = f"{100 * m['mfu']:.1f}% of {m['mfu_peak']}" if m["mfu"] is not None else "-"
            check = m["kernel_check"]
            grads = (f"ok (max {_fmt(check['max_rel_err'])})" if check["ok"] else
                     f"**WRONG**: {len(check['wrong'])} of {3 * check['convolutions']}, e.g. "
                     f"{check['wrong'][0]['part']} of {check['wrong'][0]['layers'][0]} "
                     f"({_fmt(check['wrong'][0]['rel_err'])})")
            if m["nonfinite_losses"]:
                grads += f"; {m['nonfinite_losses']} non-finite losses"
            rows.append(f"| {name} | {r['batch']} | {clip} | {recipe} | {m['clips_per_s']:.2f} | {ratio:.2f} | "
                        f"{r['gflops_per_step']:.0f} | {m['achieved_gflops']:.0f} | {mfu} | {m['optimizer']} | "
                        f"{grads} |")
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in report["practical_peak_gflops"].items())
    rows.append("")
    rows.append(f"Practical peak (GFLOP/s, {s['peak_matmul_size']}^3 matmul, this run): {peaks}. MFU = achieved "
                "GFLOP/s (3 x forward FLOPs) / the peak of the recipe's compute dtype.")
    goal = report["goal"]
    if goal:
        verdict = "met" if goal["met"] else "MISSED" + ("" if goal["kernels_correct"] else
                                                         ": fast enough but its convolutions compute wrong results"
                                                         if goal["fast_enough"] else "")
        rows.append(f"Goal: {goal['recipe']} >= {goal['target_ratio']}x {goal['against']} for resnet18 at 16x112x112 "
                    f"on {s['device']} ({'native' if s['native_bf16'] else 'emulated'} bf16): {goal['ratio']:.2f}x, "
                    f"{verdict}.")
    for name, r in report["results"].items():
        for recipe, m in r["recipes"].items():
            if "precision" in m:
                rows.append(f"{name}, {recipe}: {m['precision']}.")
    rows.append(f"({s['device_name']} [{', '.join(s['cpu_flags']) or s['device']}], {s['threads']} threads, torch {s['torch']}, median of {s['repeats']} runs "
                f"of {s['steps']} steps after {s['warmup']} warm-up steps, compile {'on' if s['compile'] else 'off'}"
                f", engine: {s['engine']})")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
