"""action3d.workspace on a real git + DVC checkout of the project's dvc.yaml and params.yaml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from action3d.config import load_params
from action3d.storage import StorageError
from action3d.workspace import Workspace, WorkspaceError

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("ws")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, root / name)
    for argv in (["git", "init", "-q", "-b", "main"], [DVC, "init", "-q"]):
        subprocess.run(argv, cwd=root, check=True, capture_output=True)
    return Workspace(root)


def test_set_params_writes_the_overrides_and_keeps_every_comment(ws):
    before = (ROOT / "params.yaml").read_text()
    (ws.root / "params.yaml").write_text(before)
    ws.set_params(["finetune.lr=0.003", "model.name=resnet18", "scratch.finetune.epochs=12"])
    after = (ws.root / "params.yaml").read_text()
    params = load_params(ws.root / "params.yaml")
    assert (params.finetune.lr, params.model.name, params.scratch.finetune.epochs) == (0.003, "resnet18", 12)
    comments = lambda text: [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]  # noqa: E731
    assert comments(after) == comments(before)
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 3 and len(before.splitlines()) == len(after.splitlines())
    assert yaml.safe_load(after)["storage"]["checkpoints"] is None  # nulls stay nulls, not empty strings


def test_a_bad_override_changes_nothing_and_names_the_key(ws):
    (ws.root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(Exception, match="finetune.lrr.*Did you mean 'finetune.lr'"):
        ws.set_params(["finetune.lr=0.5", "finetune.lrr=0.1"])
    assert (ws.root / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()


def test_stages_of_a_target_are_it_and_what_it_needs_in_dag_order(ws):
    everything = ws.stages()
    assert everything[0] == "check" and everything[-1] == "register" and "split@pretrain" in everything
    assert ws.stages(["scratch@finetune"]) == ["check", "synth@finetune", "split@finetune", "cache@finetune-0",
                                               "scratch@finetune"]
    assert "scratch@pretrain" in ws.stages(["finetune"])  # its weights are what scratch@pretrain makes
    with pytest.raises(WorkspaceError, match="no stage 'scratch@pretrian'.*scratch@pretrain"):
        ws.stages(["scratch@pretrian"])


def test_check_stops_on_bad_params_before_anything_runs(ws):
    with pytest.raises(WorkspaceError, match="unknown key 'model.nmae'"):
        ws.check(overrides=["model.nmae=resnet18"])


def test_a_missing_remote_says_how_to_set_one_up(ws):
    assert ws.remote() is None
    with pytest.raises(WorkspaceError, match="no DVC remote is configured.*action3d remote setup s3://"):
        ws.check(remote=True)


def test_an_unreachable_remote_names_the_endpoint(ws, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    ws.run(DVC, "remote", "add", "--local", "-d", "gone", "s3://some-bucket/dvc")
    ws.run(DVC, "remote", "modify", "--local", "gone", "endpointurl", "http://127.0.0.1:9")
    try:
        assert ws.remote().endpoint_url == "http://127.0.0.1:9"
        with pytest.raises(StorageError, match="Cannot reach bucket 'some-bucket' at S3 endpoint http://127.0.0.1:9"):
            ws.check_remote()
    finally:
        ws.run(DVC, "remote", "remove", "--local", "gone")


def test_an_unknown_revision_lists_the_branches(ws):
    ws.run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "first")
    with pytest.raises(WorkspaceError, match="git revision 'no-such-branch' does not exist.*main"):
        ws.checkout("no-such-branch")


def test_a_folder_without_dvc_yaml_is_refused(tmp_path):
    with pytest.raises(WorkspaceError, match="no dvc.yaml here"):
        Workspace(tmp_path)


def test_a_shallow_worker_clone_fetches_the_revision_it_is_asked_for(tmp_path):
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(ROOT / "dvc.yaml", origin / "dvc.yaml")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], [*git, "commit", "-qm", "one"],
                 ["git", "branch", "feature"], [*git, "commit", "-q", "--allow-empty", "-m", "two"]):
        subprocess.run(argv, cwd=origin, check=True, capture_output=True)
    feature = subprocess.run(["git", "rev-parse", "feature"], cwd=origin, capture_output=True, text=True).stdout.strip()
    # as Prefect's git_clone step makes it: one branch, depth 1
    subprocess.run(["git", "clone", "-q", "--depth", "1", "-b", "main", f"file://{origin}", str(tmp_path / "clone")],
                   check=True, capture_output=True)
    clone = Workspace(tmp_path / "clone")
    assert clone.checkout("feature") == feature == clone.commit()


def test_a_stage_is_current_when_the_lock_matches_its_inputs_even_with_its_outputs_missing(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n"
                                       "    outs: [out.txt]\n")
    (tmp_path / "in.txt").write_text("one\n")
    for argv in (["git", "init", "-q", "-b", "main"], [DVC, "init", "-q"], [DVC, "repro", "-q"]):
        subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True)
    ws = Workspace(tmp_path)
    assert ws.is_current("copy")
    (tmp_path / "out.txt").unlink()  # a fresh clone's: DVC has it, `dvc pull` brings it
    assert ws.is_current("copy")
    (tmp_path / "in.txt").write_text("two\n")
    assert not ws.is_current("copy")


def test_repro_names_the_stages_whose_command_ran_not_those_dvc_restored(tmp_path):
    from tests.helpers import make_project_repo

    ws = Workspace(make_project_repo(tmp_path / "project"))
    assert ws.repro("check", single=True) == ["check"]
    assert ws.repro("check", single=True) == []  # up to date
    (ws.root / "runs" / "params.ok").unlink()
    assert ws.repro("check", single=True) == []  # restored from DVC's run cache, its command not run
    assert (ws.root / "runs" / "params.ok").is_file()
    assert ws.repro("check", single=True, force=True) == ["check"]
