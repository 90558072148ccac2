"""Stage scratch: the network of `model` trained from random weights on one set, every layer.

On the large set (`scratch@pretrain`) this is pretraining, the paper's Kinetics step; on the small set
(`scratch@finetune`) it is the baseline of the transfer question, with knobs of its own (`scratch.finetune`) and
as many epochs as fine-tuning. Side by side the two answer the paper's first question: trained from scratch, a 3D
CNN overfits a small set and not a large one. A gain of fine-tuning over the baseline means something only when
the baseline fits its training set: the stage reports its last epoch's training accuracy.
"""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params, Role
from action3d.stages import RunContext


def run(params: Params, *, role: Role, manifests: str | Path, cache: str | Path, out: str | Path,
        ctx: RunContext | None = None) -> dict:
    from action3d import engine
    from action3d.data import read_classes
    from action3d.models import create_model
    from action3d.stages.training import train

    classes = read_classes(Path(manifests) / "classes.json")
    engine.seed_everything(params.seed)  # the initial weights are part of the run: same seed, same model
    model = create_model(params.model.name, n_classes=len(classes), **params.model.kwargs)
    return train(params, label=f"scratch@{role}", knobs=params.training("scratch", role), model=model, trainable=None,
                 manifests=manifests, cache=cache, out=out, ctx=ctx or RunContext(), tags={"set": role, "init": "scratch"})
