"""Stage finetune: the pretrained weights (`finetune.pretrained`) with a new head for the small set's classes,
trained from `finetune.ft_begin_module` on.

The weights are scratch@pretrain's model (this pipeline's pretraining) or a file 3D-ResNets-PyTorch publishes
(`r3d18_K_200ep.pth`): `read_checkpoint` reads both. Ours carries what rebuilds it; a published one goes into the
network `model` names (the check stage has made sure it fits).
"""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params
from action3d.stages import RunContext, source_run


def build_model(params: Params, n_classes: int, pretrained: str | Path):
    """The model to fine-tune and its trainable parameters. Seeded: same params, same new head."""
    from action3d.checkpoint import read_checkpoint
    from action3d.engine import seed_everything
    from action3d.models import create_model
    from action3d.models.transfer import freeze_before, load_pretrained, model_from_checkpoint

    seed_everything(params.seed)  # the new head is part of the run
    ckpt = read_checkpoint(pretrained)
    if "model_kwargs" in ckpt:  # ours: it says how to rebuild itself
        model = model_from_checkpoint(ckpt, n_classes=n_classes)
    else:
        model = create_model(params.model.name, n_classes=n_classes, **params.model.kwargs)
        load_pretrained(model, ckpt)
    return model, freeze_before(model, params.finetune.ft_begin_module or None)


def run(params: Params, *, manifests: str | Path, cache: str | Path, pretrained: str | Path, out: str | Path,
        ctx: RunContext | None = None) -> dict:
    from action3d.data import read_classes
    from action3d.stages.training import train

    classes = read_classes(Path(manifests) / "classes.json")
    model, trainable = build_model(params, len(classes), pretrained)
    return train(params, label="finetune", knobs=params.finetune, model=model, trainable=trainable, manifests=manifests,
                 cache=cache, out=out, ctx=ctx or RunContext(), inputs={"pretrained": Path(pretrained)},
                 source_run_id=source_run(pretrained), tags={"set": "finetune", "init": "pretrained"})
