"""The pipeline's stages, declared once: name, function, and the options (inputs and outputs) it takes.

A stage is a plain function `run(params, *, ctx, **options) -> metrics`. DVC calls it through `action3d stage NAME
--option PATH ...` (the CLI builds those commands from this table), `action3d tune` calls the training stages'
functions in-process for its trials, and the tests call them directly. No stage knows who called it: what a caller
adds to a stage's MLflow run (tags, a parent run, a callback after every epoch) comes in `ctx`, a RunContext.

Paths live in dvc.yaml's commands; the one place code needs them itself (a tuning trial runs its target on the
pipeline's inputs) is `training_inputs`, which names the same folders (tests/unit/test_stage_table.py checks).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROLES = ("pretrain", "finetune")  # the large set and the small one (params: data.<role>)
# a file each stage command, once it has run, appends its name to (dvc.yaml's, e.g. scratch@pretrain): how
# Workspace.repro learns which commands DVC ran, without reading DVC's log
RAN_LOG = "ACTION3D_RAN_LOG"


@dataclass
class RunContext:
    """What a caller adds to one stage's run, and what the stage reports back to it.

    `tags` go on the stage's MLflow run; `parent_run_id` nests the run under another (a study's, a tuning
    study's); `on_epoch(epoch, metrics)` runs after every epoch of a training stage and may raise to stop it (a
    pruned trial). The stage fills in `run_id` and, when it finishes, the `history` of every epoch."""

    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    on_epoch: Callable[[int, dict[str, float]], None] | None = None
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_params(cls, params) -> RunContext:
        """The context params.yaml gives every stage (tracking.tags, tracking.parent_run: a study's entries)."""
        return cls(tags=dict(params.tracking.tags), parent_run_id=params.tracking.parent_run)


@dataclass(frozen=True)
class Option:
    """One keyword argument of a stage function, `--name` on the command line."""

    name: str
    help: str
    choices: tuple[str, ...] = ()
    required: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # action3d.stages.<module> defines run(): imported on use, so `action3d stage check` loads no torch
    help: str
    options: tuple[Option, ...]
    trains: bool = False  # tracked per epoch, resumable, runs under torchrun when its nproc asks for more processes
    reads: tuple[str, ...] = ()  # a training stage's knobs, as dvc.yaml lists its params ({role}: the set's)

    @property
    def run(self) -> Callable[..., dict[str, Any]]:
        return importlib.import_module(f"action3d.stages.{self.module}").run

    def label(self, options: dict[str, Any]) -> str:
        """The stage's name as dvc.yaml's foreach/matrix makes it: `scratch@pretrain`, `cache@pretrain-0`,
        `evaluate@finetune`."""
        if self.name == "cache":
            return f"{self.name}@{options['role']}-{Path(options['videos']).stem}"
        if options.get("role"):
            return f"{self.name}@{options['role']}"
        return f"{self.name}@{Path(options['out']).name}" if self.name == "evaluate" else self.name


ROLE = Option("role", "which set: data.<role> of params.yaml", choices=ROLES)
MANIFESTS = Option("manifests", "the split stage's folder (train/val/test.csv, classes.json)")
CACHE = Option("cache", "the cache stage's folder (frame packs)")
OUT = Option("out", "where the stage writes")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("check", "check", "validate params.yaml and the inputs it names, before any stage removes its outputs",
          (OUT,)),
    Stage("synth", "synth", "write the demo set of a role (synth.sets.<role>) in its official layout", (ROLE, OUT)),
    Stage("split", "split", "a data set in its official layout -> manifests, validated", (ROLE, OUT)),
    Stage("cache", "cache", "one slice of a set's raw videos -> training-ready shards of frame packs",
          (ROLE, Option("videos", "the split stage's list of the slice (slices/<k>.csv)"), OUT)),
    Stage("scratch", "scratch", "train from random weights on a set (pretraining, or the baseline on the small set)",
          (ROLE, MANIFESTS, CACHE, OUT), trains=True, reads=("seed", "model", "clip", "augment", "scratch.{role}")),
    Stage("finetune", "finetune", "fine-tune the pretrained weights (finetune.pretrained) on the small set",
          (MANIFESTS, CACHE, Option("pretrained", "the weights to start from"), OUT), trains=True,
          reads=("seed", "model", "clip", "augment", "finetune")),
    Stage("evaluate", "evaluate", "video-level accuracy of a trained model on the test split",
          (Option("model", "a training stage's model.pt"), MANIFESTS, CACHE, OUT)),
    Stage("summary", "summary", "the headline numbers with their 95% intervals and the paired test, in one file",
          (Option("finetune", "evaluate@finetune's folder"), Option("scratch", "evaluate@scratch's folder"), OUT)),
    Stage("register", "register", "register the fine-tuned model; champion only if it beats the champion",
          (Option("train", "the finetune stage's folder (its run.json)"),
           Option("metrics", "the evaluate stage's metrics.json"), MANIFESTS, CACHE, OUT)),
)}


def read_output(path: str | Path, stage: str) -> dict[str, Any]:
    """A JSON file another stage writes, or an error saying which stage to run first."""
    import json

    from action3d.errors import Action3dError

    path = Path(path)
    if not path.is_file():
        raise Action3dError(f"{path} not found: it is written by the {stage} stage; run `dvc repro {stage}` first")
    return json.loads(path.read_text())


def source_run(model: str | Path) -> str | None:
    """The MLflow run that trained `model`: from the run.json a training stage writes beside its model.pt."""
    import json

    made_by = Path(model).parent / "run.json"
    return json.loads(made_by.read_text())["run_id"] if made_by.is_file() else None


def training_inputs(target: str, params) -> dict[str, Path]:
    """The inputs dvc.yaml gives training stage `target` (`finetune`, `scratch@<role>`): what a tuning trial
    trains on."""
    stage, _, role = target.partition("@")
    role = role or "finetune"
    inputs = {"manifests": Path("data/splits") / role, "cache": Path("data/cache") / role}
    if stage == "finetune":
        inputs["pretrained"] = Path(params.finetune.pretrained)
    else:
        inputs["role"] = role  # type: ignore[assignment]
    return inputs
