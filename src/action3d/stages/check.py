"""Stage check: params.yaml and the inputs it names are usable, before any other stage runs.

DVC removes a stage's outputs right before it runs the stage. A mistake first noticed by the stage that needs the
input (a misspelled checkpoint path, a checkpoint of another depth, a layout knob that does not fit the folder)
would cost that stage's outputs. Every stage of dvc.yaml depends on this stage's output, so DVC runs it first:
the params are validated when the command loads them, and here each set's folder is checked against its layout,
the demo sets against the sets that read them, and the pretrained weights against the model, reading their keys
and shapes, not their weights. Every message names the key to change. The output's content never changes, so a
valid change of params re-runs nothing downstream by itself.
"""

from __future__ import annotations

from pathlib import Path

from action3d.atomic import write_atomic_text
from action3d.config import DEMO_ROOT, PRETRAINED, Params
from action3d.errors import Action3dError
from action3d.stages import RunContext

CONTENT = "params.yaml is valid\n"


class CheckError(Action3dError):
    """What check found wrong, every problem named by its params key."""


def run(params: Params, *, out: str | Path, ctx: RunContext | None = None) -> dict:
    problems = [*data_problems(params), *model_problems(params)]
    if problems:
        raise CheckError("params.yaml names inputs that cannot be used; nothing was run or removed:\n  "
                         + "\n  ".join(problems))
    write_atomic_text(out, CONTENT)
    return {"params_digest": params.digest()}


def data_problems(params: Params) -> list[str]:
    """Each set in its folder and layout; each demo set read by a set, each set under data/demo/ made by synth."""
    from action3d.data.annotations import looks_like, missing_files

    problems = []
    for role in ("pretrain", "finetune"):
        source, demo = params.data.get(role), getattr(params.synth.sets, role)
        demo_path = f"{DEMO_ROOT}/{role}"
        if demo is not None and (source is None or Path(source.path) != Path(demo_path)):
            problems.append(f"synth.sets.{role}: makes the demo set {demo_path}, but data.{role} reads "
                            f"{'nothing' if source is None else source.path}: remove synth.sets.{role}")
        if source is None:
            continue
        path = Path(source.path)
        if path == Path(demo_path):
            if demo is None:
                problems.append(f"data.{role}.path: {demo_path} is the demo's folder, and synth.sets.{role} is not set "
                                f"to make it: set synth.sets.{role}, or point data.{role}.path at your data")
            continue
        if not path.is_dir():
            problems.append(f"data.{role}.path: {path} is not a folder here. Put your {role} set there and version it "
                            f"(`dvc add {path}`, or `dvc import-url s3://... {path}`), or `dvc pull` it")
            continue
        lacks = missing_files(source.layout, path, params.split.split)
        if lacks:
            others = [layout for layout in looks_like(path, params.split.split) if layout != source.layout]
            hint = f"; it looks like a {others[0]} folder: set data.{role}.layout: {others[0]}" if others else ""
            problems.append(f"data.{role}.layout: {source.layout} needs {lacks} in {path}, which are not there{hint}")
    return problems


def model_problems(params: Params) -> list[str]:
    """The model builds and has the module fine-tuning starts from; the weights fine-tuning starts from exist (or
    scratch@pretrain makes them) and fit it."""
    from action3d.checkpoint import CheckpointError
    from action3d.models import create_model, is_model, list_models
    from action3d.models.transfer import check_fits

    name, kwargs = params.model.name, params.model.kwargs
    if not is_model(name):
        return [f"model.name: {name!r} is not a model; `action3d models` lists them ({', '.join(list_models()[:6])}, "
                "...)"]
    import torch

    from action3d.models.transfer import freeze_before

    try:
        with torch.device("meta"):
            model = create_model(name, n_classes=2, **kwargs)
    except (TypeError, ValueError) as err:
        return [f"model.kwargs: {name} cannot be built with {kwargs} ({err})"]
    try:
        freeze_before(model, params.finetune.ft_begin_module or None)
    except ValueError as err:
        return [f"finetune.ft_begin_module: {err}"]
    pretrained = params.finetune.pretrained
    if Path(pretrained) == Path(PRETRAINED):
        if "pretrain" not in params.data:
            return [f"finetune.pretrained: {PRETRAINED} is what scratch@pretrain makes, and data has no pretrain set "
                    "to make it from: set finetune.pretrained to a checkpoint file (`dvc add` it), or add data.pretrain"]
        return []
    if not Path(pretrained).is_file():
        near = sorted(p.name for p in Path(pretrained).parent.glob("*.pt*")) if Path(pretrained).parent.is_dir() else []
        return [f"finetune.pretrained: no file {pretrained}" + (f" (that folder holds {', '.join(near[:5])})" if near
                                                                 else "") + ": fix the path, or `dvc pull` the file"]
    try:
        check_fits(pretrained, name, kwargs, knob="finetune.pretrained")
    except CheckpointError as err:
        return [str(err)]
    return []
