"""Stage finetune: a new head for the small set's classes, trained from `finetune.ft_begin_module` on.

`finetune.init` says where the weights come from:
    pretrain    this pipeline's pretraining checkpoint (`--pretrained`, the paper's transfer)
    checkpoint  a 3D-ResNets-PyTorch file (`finetune.checkpoint`), into the model `model` names
    scratch     random weights, every layer trained with these knobs (the pipeline's baseline is its own stage,
                `scratch`, with knobs of its own)
"""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params
from action3d.errors import Action3dError


def build_model(params: Params, n_classes: int, pretrained: str | Path | None):
    """The model to fine-tune and its trainable parameters, by `finetune.init`. Seeded: same params, same model."""
    from action3d.engine import seed_everything
    from action3d.checkpoint import load_pretrained, model_from_checkpoint
    from action3d.models import create_model
    from action3d.models.transfer import freeze_before

    seed_everything(params.seed)  # random weights (scratch) and the new head are part of the run
    ft = params.finetune
    if ft.init == "scratch":
        model = create_model(params.model.name, n_classes=n_classes, **params.model.kwargs)
        return model, list(model.parameters())
    if ft.init == "pretrain":
        if pretrained is None or not Path(pretrained).is_file():
            raise Action3dError(
                f"finetune.init is 'pretrain' but the pretraining checkpoint {pretrained} does not exist: run "
                "`dvc repro pretrain`, or set finetune.init to 'checkpoint' (with finetune.checkpoint) or 'scratch'")
        model = model_from_checkpoint(pretrained, n_classes=n_classes)
    else:
        if not ft.checkpoint or not Path(ft.checkpoint).is_file():
            raise Action3dError(f"finetune.init is 'checkpoint' but finetune.checkpoint ({ft.checkpoint}) is not a "
                                "file: give the path of a 3D-ResNets-PyTorch .pth (e.g. r3d18_K_200ep.pth)")
        model = create_model(params.model.name, n_classes=n_classes, **params.model.kwargs)
        load_pretrained(model, ft.checkpoint)
    return model, freeze_before(model, ft.ft_begin_module or None)


def run(
    params: Params, *, manifests_dir: str | Path, cache_dir: str | Path, out_dir: str | Path,
    pretrained: str | Path | None = None,
) -> dict:
    from action3d.data import read_classes
    from action3d.stages.common import training_run_id
    from action3d.stages.training import train_stage

    classes = read_classes(Path(manifests_dir) / "classes.json")
    model, trainable = build_model(params, len(classes), pretrained)
    ft = params.finetune
    inputs, parent = {}, None
    if ft.init == "pretrain":
        inputs["pretrained"] = Path(pretrained)
        parent = training_run_id(pretrained)
    elif ft.init == "checkpoint":
        inputs["pretrained"] = Path(ft.checkpoint)
    return train_stage(
        params, stage="finetune", model=model, trainable=trainable, train_cfg=ft, manifests_dir=manifests_dir,
        cache_dir=cache_dir, out_dir=out_dir, inputs=inputs, parent_run_id=parent, tags={"init": ft.init},
    )  # fmt: skip
