"""The `action3d` command's handling of bad input: one clear message, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import write_tiny_params


def _action3d(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "action3d.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_an_unknown_params_key_names_it_and_suggests_the_right_one(tmp_path):
    done = _action3d("stage", "synth", "--role", "finetune", "--out", str(tmp_path / "raw"), "-S", "synth.sedd=3")
    assert done.returncode == 2
    assert "unknown key 'synth.sedd'" in done.stderr and "synth.seed" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "raw").exists()


def test_a_missing_manifest_folder_points_at_the_split_stage(tmp_path):
    done = _action3d("stage", "register", "--train", str(tmp_path / "runs/finetune"), "--metrics", "m.json",
                     "--manifests", "t", "--cache", "c", "--out", str(tmp_path / "r.json"))
    assert done.returncode == 2
    assert "run.json not found" in done.stderr and "dvc repro finetune" in done.stderr


def test_models_lists_every_registered_network():
    from action3d.models import list_models

    done = _action3d("models", "resnet10")
    assert done.returncode == 0
    names = [line.split()[0] for line in done.stdout.splitlines()[2:]]
    assert names == [n for n in list_models() if "resnet10" in n] and "resnet101" in names


def _one_line_error(done: subprocess.CompletedProcess, *names: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("action3d: error: "), done.stderr
    assert all(name in lines[0] for name in names), lines[0]


def test_a_missing_params_file_is_one_line_naming_it(tmp_path):
    done = _action3d("stage", "synth", "--role", "finetune", "--out", str(tmp_path / "raw"), "--params",
                     str(tmp_path / "nope.yaml"))
    _one_line_error(done, "nope.yaml", "no such params file")
    assert not (tmp_path / "raw").exists()  # nothing ran on built-in defaults


@pytest.mark.slow  # the session's tiny data
def test_missing_model_manifests_and_cache_are_one_line_each(workdir):
    write_tiny_params(workdir)
    splits, cache = "data/splits/finetune", "data/cache/finetune"
    evaluate = ("stage", "evaluate", "--out", "runs/e")
    _one_line_error(_action3d(*evaluate, "--model", "nope.pt", "--manifests", splits, "--cache", cache,
                              cwd=workdir), "nope.pt")
    scratch = ("stage", "scratch", "--role", "finetune", "--out", "runs/s")
    _one_line_error(_action3d(*scratch, "--manifests", "no-splits", "--cache", cache, cwd=workdir), "no-splits",
                    "split stage")
    _one_line_error(_action3d(*scratch, "--manifests", splits, "--cache", "no-cache", cwd=workdir), "no-cache",
                    "cache stage")
    assert not (workdir / "runs").exists()
