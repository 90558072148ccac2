"""The stage table (action3d.stages) and dvc.yaml say the same thing: every DVC stage runs a stage of the table
with exactly its options, the inputs a tuning trial trains on are the ones dvc.yaml gives that stage, and a
training stage's knobs are the params dvc.yaml tracks for it."""

from __future__ import annotations

import pytest
from dvc.repo import Repo

from action3d.cli import build_parser
from action3d.config import load_params
from action3d.stages import STAGES, training_inputs
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    """dvc.yaml's stages as DVC resolves them (foreach and ${...} templates filled in from params.yaml)."""
    with Repo(str(ROOT)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


def options(cmd: str) -> tuple[str, dict[str, str]]:
    words = cmd.split()
    assert words[:2] == ["action3d", "stage"], cmd
    return words[2], dict(zip(words[3::2], words[4::2]))


def test_every_dvc_stage_runs_its_table_entry_with_exactly_its_options(dvc_stages):
    assert {name.split("@")[0] for name in dvc_stages} == set(STAGES)
    parser = build_parser()
    for name, stage in dvc_stages.items():
        command, given = options(stage.cmd)
        assert command == name.split("@")[0], (name, stage.cmd)
        assert set(given) == {option.flag for option in STAGES[command].options}, (name, stage.cmd)
        parser.parse_args(stage.cmd.split()[1:])  # the CLI built from the table takes the command as it is


def test_a_tuning_trial_trains_on_what_dvc_yaml_gives_its_target(dvc_stages):
    params = load_params(ROOT / "params.yaml")
    for target in ("finetune", "scratch@finetune", "scratch@pretrain"):
        _, given = options(dvc_stages[target].cmd)
        expected = {flag.removeprefix("--"): value for flag, value in given.items() if flag != "--out"}
        assert {k: str(v) for k, v in training_inputs(target, params).items()} == expected, target


def test_a_training_stage_reads_the_knobs_dvc_yaml_tracks_for_it(dvc_stages):
    for target in ("finetune", "scratch@finetune", "scratch@pretrain"):
        stage, _, role = target.partition("@")
        tracked = {key for dep in dvc_stages[target].deps if hasattr(dep, "params") for key in dep.params}
        assert tracked == {section.format(role=role) for section in STAGES[stage].reads}, target
