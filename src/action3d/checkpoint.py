"""Checkpoint files, in one place: reading (ours and the reference's), writing, and the state that resumes a run.

Two kinds of file are read, both by `read_checkpoint`, always with `torch.load(..., weights_only=True)` so that
a downloaded file can never run code:

- the reference's (kenshohara/3D-ResNets-PyTorch): {"arch", "epoch", "state_dict", "optimizer"} or a bare
  state_dict, keys often prefixed "module." (DataParallel);
- ours, made by `make_checkpoint` and written by `save_checkpoint`: {"arch": registry name, "model_kwargs",
  "state_dict" (no wrapper prefixes), "epoch" (epochs completed), "optimizer", "scheduler", "rng",
  "best_metric", "history", **extra}. "arch" + "model_kwargs" rebuild the model
  (`action3d.models.transfer.model_from_checkpoint`), the rest resumes a run where it stopped (`restore_checkpoint`).

Only tensors and plain containers (dict, list, tuple, str, int, float, bool, None) survive weights_only loading:
keep anything else (numpy arrays, custom objects) out of a checkpoint, or convert it to tensors or lists first.
A file that is not a checkpoint (a video, a text file, a truncated download, a pickled nn.Module) raises
`CheckpointError` naming the file and what was expected.

Weights into a model (fine-tuning's `load_pretrained`, the params check's `check_fits`, `model_from_checkpoint`)
live with the models, in `action3d.models.transfer`; this module only reads and writes the files.

Pure torch: nothing here imports the MLOps stack (mlflow, prefect, pydantic) or a video decoder.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from action3d.atomic import atomic_write, copy_atomic
from action3d.errors import Action3dError
from action3d.models.registry import unwrap_model

LAST, BEST = "last.pt", "best.pt"  # a training run's checkpoints: after its latest epoch, after its best one
EXPECTED = "an action3d checkpoint (model.pt written by a training stage) or a 3D-ResNets-PyTorch .pth"

# DataParallel / DistributedDataParallel save "module.", torch.compile "_orig_mod.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

Source = str | os.PathLike | Mapping


class CheckpointError(Action3dError, RuntimeError):
    """A checkpoint could not be read or written, or is not one; the message names the file."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tensors do not fit the model it is loaded into; the message names the key and the fix."""


# --- reading -----------------------------------------------------------------------------------------------------


def source_name(source: Source) -> str:
    """A checkpoint source as error messages name it."""
    return "checkpoint dict" if isinstance(source, Mapping) else str(source)


def _strip_wrapper_prefix(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _not_a_checkpoint(where: str, why: str, fix: str = "") -> CheckpointError:
    fix = f" Fix: {fix}." if fix else ""
    return CheckpointError(f"{where} is not a checkpoint: {why}. Expected {EXPECTED}.{fix}")


def _looks_like(head: bytes) -> str:
    """A guess at what a file that torch cannot read is, from its first bytes."""
    if head[4:8] == b"ftyp" or head[:4] in (b"RIFF", b"\x1aE\xdf\xa3"):  # MP4/MOV, AVI, Matroska/WebM
        return "it looks like a video file"
    if head.startswith(b"PK\x03\x04"):
        return "it is a damaged PyTorch file (truncated, or cut off while copying?)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "it is not a file torch can read"
    return "it looks like a text file"


def _code_globals(path: Path, err: Exception) -> list[str]:
    """The classes and functions a pickle needs code for (a pickled nn.Module or custom object), if that is why
    weights_only loading refused it."""
    if zipfile.is_zipfile(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except Exception:  # damaged inside: say what the error said, below
                pass
    return re.findall(r"GLOBAL ([\w.]+)", str(err))


def _load_file(path: Path, map_location: str | torch.device, mmap: bool = False) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Expected {EXPECTED}.")
    if not path.is_file():
        raise _not_a_checkpoint(str(path), "it is a directory, not a file")
    if path.stat().st_size == 0:
        raise _not_a_checkpoint(str(path), "the file is empty")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch says UnpicklingError, EOFError, RuntimeError, even KeyError for a text file
        needs_code = _code_globals(path, err)
        if needs_code:
            raise _not_a_checkpoint(
                str(path),
                f"it holds pickled Python objects ({', '.join(needs_code[:3])}) that only their code can rebuild, "
                "and checkpoints are loaded with weights_only=True so that a file never runs code",
                "in a session that trusts the file, re-save only its weights, e.g. `m = torch.load(path, "
                "weights_only=False); torch.save({'state_dict': m.state_dict()}, 'weights.pth')` for a saved "
                "model, or keep only the tensors of a saved dict",
            ) from err
        with open(path, "rb") as f:
            why = _looks_like(f.read(16))
        if isinstance(err, (RuntimeError, OSError)):  # e.g. the zip reader's "failed finding central directory"
            why += f" ({str(err).split('. ')[0]})"
        raise _not_a_checkpoint(str(path), why) from err


def read_checkpoint(source: Source, *, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file (or take a dict) and normalise it; the one reader of every checkpoint.

    Returns a dict with at least "state_dict" (wrapper prefixes such as "module." removed) plus whatever else the
    file holds ("arch", "epoch", "model_kwargs", ...). A bare state_dict comes back as {"state_dict": ...}.
    Anything else (not a PyTorch file, a pickle that needs code, a dict without a state_dict) raises
    `CheckpointError` naming the file and what was expected.
    """
    where = source_name(source)
    ckpt = source if isinstance(source, Mapping) else _load_file(Path(source), map_location)
    if not isinstance(ckpt, Mapping):
        raise _not_a_checkpoint(where, f"it holds a {type(ckpt).__name__}, not a dict of weights")
    state, extra = ckpt, {}  # a bare state_dict
    if "state_dict" in ckpt:
        state, extra = ckpt["state_dict"], {k: v for k, v in ckpt.items() if k != "state_dict"}
    if not (isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise _not_a_checkpoint(
            where,
            "its 'state_dict' is not a dict of tensors" if "state_dict" in ckpt else
            f"a dict with neither a 'state_dict' entry nor only tensors (its keys: {sorted(map(str, ckpt))[:10]})",
        )  # fmt: skip
    return {**extra, "state_dict": {_strip_wrapper_prefix(k): v for k, v in state.items()}}


# --- writing -----------------------------------------------------------------------------------------------------


def epochs_done(path: str | os.PathLike) -> int:
    """The epochs a training checkpoint holds done, 0 when it is missing or unreadable; memory-mapped, so the
    weights are not read (fit, which resumes from it, says what is wrong with a bad one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError):
        return 0
    return int(state.get("epoch") or 0) if isinstance(state, Mapping) else 0


def _guarded(path: str | os.PathLike, write: Callable[[], Path]) -> Path:
    path = Path(path)
    try:
        return write()
    except Exception as err:
        raise CheckpointError(
            f"could not write {path}: {err}. The previous {path.name}, if any, is untouched; "
            "free disk space (or fix the cause) and run again to resume from it."
        ) from err


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint dict atomically: a crash or a full disk leaves the previous file or the new one, never
    half; a failure raises `CheckpointError` naming the file."""
    return _guarded(path, lambda: atomic_write(path, lambda f: torch.save(dict(state), f)))


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a checkpoint file atomically (e.g. last.pt -> best.pt), failing as `save_checkpoint` does."""
    return _guarded(dst, lambda: copy_atomic(src, dst))


# --- resume state ------------------------------------------------------------------------------------------------


def capture_rng_state(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """Every random state a run consumes: python, numpy, torch CPU and CUDA, and the given generators.

    Stored as tensors, ints and lists so that the checkpoint loads with weights_only=True.
    """
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def restore_rng_state(state: Mapping[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Put back what `capture_rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generators = list(generators)
    if len(generators) != len(state["generators"]):
        warnings.warn(
            f"the checkpoint holds {len(state['generators'])} loader generator state(s), the loaders now have "
            f"{len(generators)}: the data order after resuming will differ from an uninterrupted run"
        )
        return
    for gen, gen_state in zip(generators, state["generators"]):
        gen.set_state(gen_state.cpu())


def make_checkpoint(
    model: nn.Module,
    *,
    arch: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    best_metric: float | None = None,
    history: list[dict[str, float]] | None = None,
    generators: Iterable[torch.Generator] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Our checkpoint dict: what rebuilds the model (`arch` + `model_kwargs`, by default the `model.arch` and
    `model.model_kwargs` that `create_model` sets), its weights without DDP/compile prefixes, optimiser,
    scheduler, `epoch` (epochs completed), RNG states, best metric and per-epoch history. `extra` entries (e.g. an
    MLflow run id) are stored alongside under their own keys."""
    target = unwrap_model(model)
    if arch is None or model_kwargs is None:
        if not hasattr(target, "arch"):
            raise ValueError(
                f"{type(target).__name__} has no `arch`: build models with action3d.models.create_model, or pass "
                "arch and model_kwargs, so that the checkpoint can rebuild the model"
            )
        arch = target.arch if arch is None else arch
        model_kwargs = target.model_kwargs if model_kwargs is None else model_kwargs
    state = {
        "arch": arch,
        "model_kwargs": dict(model_kwargs),
        "state_dict": target.state_dict(),
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(generators),
        "best_metric": best_metric,
        "history": list(history or []),
    }
    for key, value in (extra or {}).items():
        if key in state:
            raise ValueError(f"extra checkpoint key '{key}' would overwrite a core entry")
        state[key] = value
    return state


def restore_checkpoint(
    state: Mapping[str, Any],
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    generators: Iterable[torch.Generator] = (),
    source: str = "checkpoint",
) -> int:
    """Resume from a checkpoint dict: load weights (strictly), optimiser, scheduler and RNG states; return the
    epochs completed. `source` names the file in errors."""
    try:
        unwrap_model(model).load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise CheckpointMismatchError(f"{source} does not fit this model (arch '{state.get('arch')}'): {err}") from err
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("rng") is not None:
        restore_rng_state(state["rng"], generators)
    return int(state.get("epoch") or 0)
