"""The pipeline flow under Prefect's test harness (a real Prefect server on loopback, as `python flows/pipeline.py`
starts an ephemeral one): a bad override or target stops it before any stage runs. A whole run of the flow, and a
second that runs nothing, are in test_prefect_worker.py, on a worker."""

from __future__ import annotations

import importlib.util

import pytest

from action3d.workspace import WorkspaceError
from tests.helpers import ROOT, make_project_repo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_bad_override_or_target_stops_the_flow_before_any_stage(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    repo = make_project_repo(tmp_path / "repo")
    spec = importlib.util.spec_from_file_location("pipeline_flow", ROOT / "flows/pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with prefect_test_harness(server_startup_timeout=240):
        with pytest.raises(WorkspaceError, match="unknown key 'finetune.lrr'.*Did you mean"):
            module.pipeline(overrides=["finetune.lrr=0.1"], root=str(repo))
        with pytest.raises(WorkspaceError, match="no stage 'scratch@pretrian'.*scratch@pretrain"):
            module.pipeline(targets=["scratch@pretrian"], root=str(repo))
    # (no capsys here: Prefect's log handler keeps the stream it first sees, and capsys closes its own)
    assert not (repo / "data/demo").exists() and not (repo / "runs").exists()  # no stage ran
