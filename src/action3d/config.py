"""Typed params: params.yaml + dotted overrides -> one frozen `Params` object.

params.yaml is the one source of truth for every knob. DVC reads it for stage dependencies, the CLI, Prefect
flows and Optuna change it with the same dotted overrides (`finetune.lr=0.01`), and every stage receives the
validated `Params`. An unknown key is an error that names it and suggests the closest known key.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from action3d.errors import Action3dError
from action3d.project import digest


class ParamsError(Action3dError):
    """params.yaml or an override is wrong; the message says which key and what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the data sets: where each comes from --------------------------------------------------------------------

Role = Literal["pretrain", "finetune"]  # the large set (pretraining) and the small one (fine-tuning, the baseline)
Layout = Literal["kinetics", "ucf101", "hmdb51", "folder"]
DEMO_ROOT = "data/demo"  # where stage synth writes the demo set of a role: data/demo/<role>
PRETRAINED = "runs/scratch/pretrain/model.pt"  # the model stage scratch@pretrain makes


class DataSet(Section):
    path: str  # a folder in `layout`: the demo's (data/demo/<role>) or yours, tracked by DVC
    layout: Layout


class SynthPretrain(Section):
    classes: int = 24
    train_per_class: int = 16
    val_per_class: int = 3
    test_per_class: int = 3
    looks: int = Field(25, ge=1)


class SynthFinetune(Section):
    classes: int = 7
    groups: int = 25
    clips_per_group: int = 1
    test_groups: int | None = None


class SynthSets(Section):
    """The demo sets stage synth makes, by role (data/demo/<role>); an absent role is not made."""

    pretrain: SynthPretrain | None = None
    finetune: SynthFinetune | None = None


class Synth(Section):
    seed: int = 0
    width: int = 320
    height: int = 240
    fps: int = 25
    seconds: float = 1.6
    gop: int = 250
    crf: int = 18
    sets: SynthSets = SynthSets(pretrain=SynthPretrain(), finetune=SynthFinetune())


class Split(Section):
    split: Literal[1, 2, 3] = 1
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    probe: bool = True
    min_frames: int = 16
    allow_leakage: bool = False
    min_coverage: float = Field(0.0, ge=0.0, le=1.0)  # found and readable / listed, per subset; below it: stop


class Cache(Section):
    short_side: int = 128
    quality: int = Field(90, ge=1, le=100)
    shard_mb: float = Field(256, gt=0)  # about this many MB per shard file (DVC, S3 and copies pay per file)
    slices: list[int] = [0]  # one DVC stage per slice (cache@<role>-<k>): [0, 1, ..., K-1] lets K machines build

    @field_validator("slices")
    @classmethod
    def _slices_count_from_0(cls, value: list[int]) -> list[int]:
        if value != list(range(len(value))) or not value:
            raise ValueError(f"slices must be the slice numbers 0, 1, ..., K-1 in order (K slices); got {value}. For "
                             f"4 machines: [0, 1, 2, 3]")
        return value


# --- model and training ----------------------------------------------------------------------------------------


class Model(Section):
    name: str = "resnet18"
    kwargs: dict[str, Any] = {}


class Clip(Section):
    frames: int = 16
    crop_size: int = 112
    stride: int = Field(1, ge=1)


class Augment(Section):
    scales: list[float] = [1.0, 2**-0.25, 2**-0.5, 2**-0.75, 0.5]
    hflip: float = Field(0.5, ge=0.0, le=1.0)


class Train(Section):
    epochs: int = 10
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 1e-3
    nesterov: bool = False
    scheduler: Literal["plateau", "multistep", "cosine"] = "plateau"
    plateau_patience: int = 10
    milestones: list[int] = [50, 100, 150]
    warmup_epochs: int = 0
    grad_clip: float | None = None
    keep: Literal["last", "best"] = "last"  # model.pt: the last epoch's weights (the reference's) or the best epoch's
    bf16: bool = True
    channels_last: bool = True
    compile: bool = False
    workers: int = 2
    device: str = "auto"  # auto = cuda when available (cuda:LOCAL_RANK under torchrun), else cpu
    nproc: int | Literal["auto"] = "auto"  # processes; auto = every visible GPU (1 on CPU); >1 runs under torchrun
    nnodes: int = Field(1, ge=1)  # machines training this stage together (torchrun, c10d rendezvous: `distributed`)

    @model_validator(mode="after")
    def _warmup_fits(self):
        return _check_warmup(self)

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs_is_a_number(cls, value):
        if value is None:  # it once meant "as many as finetune.epochs", which DVC cannot see
            raise ValueError("set a number of epochs (the baseline scratch.finetune: as many as finetune.epochs, "
                             "for a fair comparison); DVC re-runs a stage only when its own section changes, so "
                             "one section cannot follow another")
        return value

    @field_validator("nproc", mode="before")
    @classmethod
    def _nproc_is_auto_or_positive(cls, value):
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("nproc is the number of training processes: 'auto' or an integer >= 1")
        return value


def _check_warmup(section: Train) -> Train:
    if section.scheduler == "cosine" and section.epochs <= section.warmup_epochs:
        raise ValueError(f"the cosine schedule needs epochs ({section.epochs}) > warmup_epochs "
                         f"({section.warmup_epochs}): raise epochs or lower warmup_epochs")
    return section


class Scratch(Section):
    """Training from random weights, per set: on the large set this is pretraining, on the small one the baseline."""

    pretrain: Train = Train(epochs=40, lr=0.1)
    finetune: Train = Train()  # the same epochs as Finetune()


class Finetune(Train):
    lr: float = 1e-3
    weight_decay: float = 1e-5
    ft_begin_module: str = "layer4"
    pretrained: str = PRETRAINED  # the weights to start from: scratch@pretrain's model, or a 3D-ResNets-PyTorch file


class Evaluate(Section):
    batch_size: int = 16
    workers: int = 2
    time_shuffle_control: bool = True
    device: str = "auto"
    channels_last: bool = True


class Registry(Section):
    model_name: str = "action3d-demo"
    metric: str = "video_top1"


class Tracking(Section):
    experiment: str = "action3d"
    parent_run: str | None = None  # nest every stage's MLflow run under this run (a study sets it for its entries)
    tags: dict[str, str] = {}  # more tags on every stage's run (a study sets study and study_entry)


class Storage(Section):
    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL; null + no variable = AWS itself
    region: str | None = None
    checkpoints: str | None = None  # s3://bucket/prefix: training mirrors its checkpoints there every epoch


class Study(Section):
    """The architecture study (flows/study.py): the pipeline once per entry, side by side, one table."""

    parallel: int | Literal["auto"] = "auto"  # entries at once: auto = one per visible GPU (1 on CPU)
    targets: list[str] = ["summary"]  # the stages each entry runs (and what they need); summary = both models
    entries: dict[str, list[str]] = {"resnet10": ["model.name=resnet10"], "resnet18": ["model.name=resnet18"]}

    @field_validator("parallel")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be a positive number of entries run at once, or auto (one per visible GPU)")
        return value


class Distribution(Section):
    """One knob's search range in `tune.space`: float (log for rates), int (step), or categorical (choices)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical distribution needs choices: [a, b, ...]")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} distribution needs low and high")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}): swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low}): a log scale has no zero")
        if self.log and self.step is not None:
            raise ValueError("log and step do not combine (Optuna samples one or the other)")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an int distribution needs whole low and high (got {self.low}, {self.high})")
        return self


class Tune(Section):
    """Hyperparameter tuning (`action3d tune`): a stage's function run per trial, its metric maximised."""

    target: Literal["finetune", "scratch@finetune", "scratch@pretrain"] = "finetune"
    metric: str = "val_video_top1"  # reported every epoch; the trial's value is its best epoch
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: int = Field(12, ge=1)  # complete + pruned, over every worker
    timeout: float | None = None  # seconds per worker, null = none
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(3, ge=0)  # trials before TPE models and the median pruner prunes
    warmup_epochs: int = Field(2, ge=0)  # epochs of every trial the median pruner never prunes
    storage: str | None = None  # null = a journal file runs/tune/<study>.journal; or an RDB URL (postgresql://...)
    study: str | None = None  # null = the target's name
    grace_period: float = Field(900, gt=0)  # seconds without an epoch after which a running trial counts as dead
    space: dict[str, Distribution] = {}

    @field_validator("space")
    @classmethod
    def _known_keys(cls, space):
        known = set(_known_keys())
        for key in space:
            if key not in known and not key.startswith("model.kwargs."):
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"'{key}' is not a params key.{hint} Keys are dotted paths of params.yaml "
                                 "(finetune.lr, clip.stride, ...)")
            if key.startswith(("tune.", "study.")):
                raise ValueError(f"'{key}': tuning the tuner is not supported")
        return space


def _demo_sets() -> dict[str, DataSet]:
    return {"pretrain": DataSet(path=f"{DEMO_ROOT}/pretrain", layout="kinetics"),
            "finetune": DataSet(path=f"{DEMO_ROOT}/finetune", layout="ucf101")}


class Distributed(Section):
    """Where the machines of a multi-node training stage (a section's nnodes > 1) meet: torchrun's c10d rendezvous."""

    rdzv_endpoint: str | None = None  # HOST:PORT every node reaches (node 0's); the train flow sets it per job
    max_restarts: int = Field(3, ge=0)  # torchrun restarts every rank (from the last checkpoint) this many times

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None and (":" not in value or not value.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"rdzv_endpoint is HOST:PORT (a port every node can reach on node 0); got {value!r}")
        return value


class Params(Section):
    seed: int = 0
    data: dict[Role, DataSet] = Field(default_factory=_demo_sets)
    synth: Synth = Synth()
    split: Split = Split()
    cache: Cache = Cache()
    model: Model = Model()
    clip: Clip = Clip()
    augment: Augment = Augment()
    scratch: Scratch = Scratch()
    finetune: Finetune = Finetune()
    evaluate: Evaluate = Evaluate()
    registry: Registry = Registry()
    tracking: Tracking = Tracking()
    storage: Storage = Storage()
    study: Study = Study()
    tune: Tune = Tune()
    distributed: Distributed = Distributed()

    @field_validator("data")
    @classmethod
    def _has_finetune(cls, data):
        if "finetune" not in data:
            raise ValueError("no finetune set: the pipeline fine-tunes and evaluates on data.finetune (path and "
                             "layout)")
        return data

    def flat(self) -> dict[str, Any]:
        """Every knob as a dotted key, for MLflow params and Optuna."""
        return flatten(self.model_dump())

    def digest(self) -> str:
        """Stable hash of all knobs: the `params_hash` lineage tag."""
        return digest(self.model_dump(), length=16)

    def training(self, stage: str, role: Role | None = None) -> Train:
        """The knobs of a training stage: `finetune`, or `scratch` on the set `role`."""
        return self.finetune if stage == "finetune" else getattr(self.scratch, role or "")


# --- loading ---------------------------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}; an empty mapping stays one value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _known_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(f"{prefix}{name}")
        for sub in (field.annotation, *get_args(field.annotation)):  # a section, or an optional one
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                keys += _known_keys(sub, f"{prefix}{name}.")
                break
    return keys


def _unknown_key_message(dotted: str, source: str) -> str:
    hint = difflib.get_close_matches(dotted, _known_keys(), n=1)
    also = f" Did you mean '{hint[0]}'?" if hint else ""
    return f"{source}: unknown key '{dotted}'.{also} Known keys are listed in params.yaml."


def parse_override(override: str) -> tuple[list[str], Any]:
    """`dotted.key=value` -> (the key's parts, the value parsed as YAML: `0.01`, `true`, `[1, 2]`, `{a: 1}`)."""
    if "=" not in override:
        raise ParamsError(f"override '{override}' is not of the form key=value (e.g. finetune.lr=0.01)")
    dotted, text = override.split("=", 1)
    try:
        return dotted.strip().split("."), yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"override '{override}': the value is not valid YAML ({err})") from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place (to a plain dict, or to ruamel's round-trip mapping)."""
    (*parents, leaf), value = parse_override(override)
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override '{override}': '{'.'.join(parents[: i + 1])}' is a value, not a section")
    node[leaf] = value


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read params.yaml (None = the built-in defaults), apply overrides, validate. Unknown keys and a missing
    file are errors: running on defaults nobody chose is worse than stopping."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"{path}: no such params file. Run from the project folder (where params.yaml is), "
                              "or pass --params PATH")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ParamsError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for override in overrides:
        apply_override(raw, override)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_explain(err, str(path or "defaults"))) from None


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for problem in err.errors():
        dotted = ".".join(str(p) for p in problem["loc"])
        if problem["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(dotted, source))
        else:
            given = problem.get("input")
            got = "" if isinstance(given, dict) else f" (got {given!r})"  # a whole section says nothing more
            lines.append(f"{source}: '{dotted}': {problem['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)
