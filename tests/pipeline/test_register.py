"""The register stage on real runs: a champion measured on another test split is re-scored, with the evaluate
stage's own scoring, before it is compared; and what the stages write under runs/ holds no path of this machine."""

from __future__ import annotations

import json

import pytest

from action3d.config import load_params
from action3d.project import tracking_uri
from action3d.stages import STAGES
from action3d.stages.register import split_digest
from tests.helpers import ROOT, TINY

pytestmark = pytest.mark.slow


def test_a_changed_test_split_rescores_the_champion_and_runs_hold_no_machine_path(workdir):
    from mlflow import MlflowClient

    params = load_params(ROOT / "params.yaml", TINY)
    splits, cache = workdir / "data/splits/finetune", workdir / "data/cache/finetune"
    test_csv = splits / "test.csv"

    def train_and_evaluate(name: str, params) -> dict:  # models trained on the small set: any training run registers
        STAGES["scratch"].run(params, role="finetune", manifests=splits, cache=cache, out=workdir / f"runs/{name}")
        return STAGES["evaluate"].run(params, model=workdir / f"runs/{name}/model.pt", manifests=splits, cache=cache,
                                      out=workdir / f"runs/evaluate/{name}")

    def register_(name: str) -> dict:
        return STAGES["register"].run(params, train=workdir / f"runs/{name}", manifests=splits, cache=cache,
                                      metrics=workdir / f"runs/evaluate/{name}/metrics.json",
                                      out=workdir / "runs/register/registration.json")

    train_and_evaluate("first", params)
    first = register_("first")
    assert (first["version"], first["alias"], first["created"]) == ("1", "champion", True)
    old_digest = split_digest(test_csv, cache)

    # the test split changes (a video leaves it); a second model is trained and measured on the new split
    lines = test_csv.read_text().splitlines(keepends=True)
    assert len(lines) >= 3, "the tiny test split needs two videos or more"
    test_csv.write_text("".join(lines[:-1]))
    new_digest = split_digest(test_csv, cache)
    second_metrics = train_and_evaluate("second", load_params(ROOT / "params.yaml", [*TINY, "seed=1"]))
    # what the first model scores on the new split, measured here by the evaluate stage itself
    first_on_new = STAGES["evaluate"].run(params, model=workdir / "runs/first/model.pt", manifests=splits, cache=cache,
                                          out=workdir / "runs/evaluate/first-again")["video_top1"]

    second = register_("second")
    assert second["created"] and second["version"] == "2"
    client = MlflowClient(tracking_uri())
    champion_tags = client.get_model_version(params.registry.model_name, "1").tags
    assert champion_tags["data_digest"] == old_digest
    assert float(champion_tags[f"rescore.{new_digest}.video_top1"]) == pytest.approx(first_on_new)
    assert second["compared"] == {"version": "1", "score": pytest.approx(first_on_new), "rescored": True}
    wins = second_metrics["video_top1"] > first_on_new
    assert second["alias"] == ("champion" if wins else "challenger"), second["reason"]
    champion = client.get_model_version_by_alias(params.registry.model_name, "champion")
    assert str(champion.version) == ("2" if wins else "1")
    assert "re-scored" in second["reason"] and new_digest in second["reason"]
    tags = client.get_model_version(params.registry.model_name, "2").tags
    assert tags["promotion"] == second["reason"] and tags["compared.version"] == "1"

    # tracked files: the store relative to the project root, and no absolute path of this machine anywhere
    assert second["tracking_uri"] == "sqlite:///mlflow.db" and tracking_uri().startswith("sqlite:////")
    assert json.loads((workdir / "runs/first/run.json").read_text())["tracking_uri"] == "sqlite:///mlflow.db"
    machine_paths = {str(workdir).encode(), str(workdir.resolve()).encode()}
    written = [p for p in (workdir / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "registration.json" for p in written) and any(p.name == "run.json" for p in written)
    leaks = [str(p.relative_to(workdir)) for p in written if any(m in p.read_bytes() for m in machine_paths)]
    assert leaks == []


def test_the_test_data_digest_changes_with_the_frames_not_only_the_split_file(workdir):
    splits, cache = workdir / "data/splits/finetune", workdir / "data/cache/finetune"
    before = split_digest(splits / "test.csv", cache)
    assert split_digest(splits / "test.csv", cache) == before
    index = cache / "slice-0" / "index.csv"
    index.write_text(index.read_text().replace(",", ";", 1))  # other frames
    assert split_digest(splits / "test.csv", cache) != before
