"""The README's walk-through "UCF-101 and a published checkpoint" on a tiny UCF-101-layout folder and a checkpoint
saved as 3D-ResNets-PyTorch saves them ({'epoch', 'arch': 'resnet-18', 'state_dict', 'optimizer'}): `dvc add`, the
settings in params.yaml, `dvc repro`, with no edit of dvc.yaml. Then the everyday mistakes, each caught by the check
stage with its key named, before any stage removes an output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from action3d.config import apply_override
from action3d.project import file_md5
from tests.helpers import make_project_repo, ran, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHECKPOINT = "models/r3d18_K_200ep.pth"
# The README's settings for UCF-101 from a published checkpoint (at the tiny sizes of the tests: the README uses the
# checkpoint's width, 112-pixel crops and 16 frames).
WALKTHROUGH = [
    "data={finetune: {path: data/ucf101, layout: ucf101}}",  # no pretrain set: no pretraining
    "synth.sets={}",  # no demo data
    f"finetune.pretrained={CHECKPOINT}",
    "model.name=resnet18", "model.kwargs={widen_factor: 0.125}",
    "registry.model_name=r3d18-ucf101",
]


def set_params(repo: Path, *overrides: str) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for override in overrides:
        apply_override(raw, override)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def outputs(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "runs").rglob("*"))
            if p.is_file() and not {"checkpoints", "timings"} & set(p.parts) and p.name != "params.ok"}


def reference_checkpoint(path: Path, depth: int, seed: int = 0) -> Path:
    """A checkpoint as 3D-ResNets-PyTorch's main.py saves it, DataParallel's `module.` prefix included."""
    from action3d.models import create_model

    torch.manual_seed(seed)
    model = create_model(f"resnet{depth}", n_classes=400, widen_factor=0.125)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 200, "arch": f"resnet-{depth}", "optimizer": {},
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The project after the walk-through's `dvc repro`: (repo, that repro's output)."""
    from action3d.data.synthetic import synth_ucf101

    repo = make_project_repo(tmp_path_factory.mktemp("own-data") / "project")
    synth_ucf101(repo / "data/ucf101", classes=3, groups=4, clips_per_group=1, width=64, height=48, seconds=1.0,
                 crf=28, seed=5, progress=False)  # UCF-101's layout: <Class>/v_<Class>_gNN_cMM.avi + lists
    (repo / "data/ucf101/.synth.json").unlink()  # as a download has it: only the layout's own files
    reference_checkpoint(repo / CHECKPOINT, 18)
    run(repo, "dvc", "add", "data/ucf101", CHECKPOINT)
    set_params(repo, *WALKTHROUGH)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "UCF-101 and a published checkpoint")
    done = run(repo, "dvc", "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "the run")
    return repo, done.stdout


def test_a_published_checkpoint_fine_tunes_on_ucf101_with_no_edit_of_dvc_yaml(walkthrough):
    from mlflow import MlflowClient

    repo, output = walkthrough
    assert ran(output) == {"check", "split@finetune", "cache@finetune-0", "scratch@finetune", "finetune",
                           "evaluate@finetune", "evaluate@scratch", "summary", "register"}  # no pretraining, no demo
    assert run(repo, "git", "diff", "HEAD~2", "--", "dvc.yaml").stdout == ""
    registration = json.loads((repo / "runs/register/registration.json").read_text())
    assert registration["name"] == "r3d18-ucf101" and registration["alias"] == "champion"

    # the published checkpoint is a DVC dependency, and its digest is in the run's lineage
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["finetune"]
    assert {"path": CHECKPOINT, "md5": file_md5(repo / CHECKPOINT)}.items() <= next(
        d for d in lock["deps"] if d["path"] == CHECKPOINT).items()
    run_id = json.loads((repo / "runs/finetune/run.json").read_text())["run_id"]
    tags = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["data_digest.pretrained"] == file_md5(repo / CHECKPOINT)
    assert "source_run_id" not in tags or tags["source_run_id"] in ("", "None")  # no run of ours made it
    plots = run(repo, "dvc", "plots", "show", check=False)
    assert plots.returncode == 0 and "failed to load" not in plots.stdout + plots.stderr

    # a new checkpoint at the same path makes fine-tuning stale, as any input would
    reference_checkpoint(repo / CHECKPOINT, 18, seed=1)
    assert {"finetune"} <= set(json.loads(run(repo, "dvc", "status", "--json").stdout))
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q", "--force")


@pytest.mark.parametrize(("change", "key", "says"), [
    (["finetune.pretrained=models/r3d18_K_200ep.pt"], "finetune.pretrained", "no file models/r3d18_K_200ep.pt"),
    (["finetune.pretrained=models/r3d34.pth"], "finetune.pretrained", "is a resnet-34 (its 'arch'), but model.name is "
                                                                       "resnet18: set model.name: resnet34"),
    (["data.finetune.layout=hmdb51"], "data.finetune.layout",
     "hmdb51 needs HMDB-51's split files (*_test_split1.txt) in data/ucf101, which are not there; it looks like a "
     "ucf101 folder: set data.finetune.layout: ucf101"),
    (["model.name=resnet34"], "finetune.pretrained", "model.name is resnet34: set model.name: resnet18"),
])
def test_an_everyday_mistake_is_named_at_check_and_every_output_stays(walkthrough, change, key, says):
    repo, _ = walkthrough
    reference_checkpoint(repo / "models/r3d34.pth", 34)
    before = outputs(repo)
    set_params(repo, *change)
    try:
        done = run(repo, "dvc", "repro", check=False)
        said = done.stdout + done.stderr
        assert done.returncode != 0 and ran(done.stdout) == {"check"}, said[-3000:]
        assert key in said and says in said, said[-3000:]
        assert outputs(repo) == before  # every stage's outputs still there, byte for byte
    finally:
        run(repo, "git", "checkout", "-q", "--", "params.yaml")
