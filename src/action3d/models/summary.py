"""The model table behind `action3d models`: size and cost of every registered network.

Networks are built on the "meta" device (shapes only, no memory) and their forward FLOPs counted there with torch's
FlopCounterMode: seconds for the whole zoo, which is still several times the cost of importing torch. So the table
ships with the package (action3d/model_table.json, written by `python -m action3d.models.summary`) and `action3d
models` prints it without importing torch; a unit test measures the models again and fails when the file no longer
matches them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from action3d.atomic import write_json

from .registry import create_model, list_models, model_family

# model_table() at its defaults, what `action3d models` prints: outside models/, a dep of the training stages, so
# that rewriting it never makes one stale
TABLE = Path(__file__).parents[1] / "model_table.json"


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs).eval()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _ShapeOnlyBatchNorm(TorchDispatchMode):
    """Answer BatchNorm with an empty tensor of the input's shape.

    On "meta" BatchNorm runs a Python decomposition that takes half the time of a
    forward pass; FlopCounterMode does not count it, so only its shape matters.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.native_batch_norm.default:
            x = args[0]
            return torch.empty_like(x), x.new_empty(0), x.new_empty(0)
        return func(*args, **(kwargs or {}))


def _flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, _ShapeOnlyBatchNorm(), torch.no_grad():
        model(torch.empty(shape, device="meta"))
    return counter.get_total_flops()


def count_params(name: str, **kwargs) -> int:
    """Parameters of registered model `name` built with `kwargs`, without allocating them."""
    return _params(_meta_model(name, **kwargs))


def count_flops(name: str, clip: tuple[int, int, int] = (16, 112, 112), **kwargs) -> int:
    """Forward FLOPs of one clip [1, n_input_channels, T, H, W] (a multiply-add counts 2)."""
    return _flops(_meta_model(name, **kwargs), (1, kwargs.get("n_input_channels") or 3, *clip))


def model_table(
    *, names: list[str] | None = None, n_classes: int = 400, clip: tuple[int, int, int] = (16, 112, 112),
    progress: bool = False
) -> list[dict]:
    """One row per registered model (or per one of `names`): {"name", "family", "params", "flops"}.

    params: parameter count at `n_classes`; flops: forward FLOPs for one clip of
    `clip` = (T, H, W) frames, multiply-add = 2.
    """
    rows = []
    for name in tqdm(list_models() if names is None else names, desc="models", disable=not progress):
        model = _meta_model(name, n_classes=n_classes)
        rows.append({
            "name": name,
            "family": model_family(name),
            "params": _params(model),
            "flops": _flops(model, (1, 3, *clip)),
        })
    return rows


def write_table(path: Path = TABLE) -> Path:
    """Measure every model (`model_table` at its defaults) into `path`: the table `action3d models` prints."""
    return write_json(path, model_table(progress=True))


if __name__ == "__main__":  # after adding or changing a model: python -m action3d.models.summary
    print(f"wrote {write_table()}")
