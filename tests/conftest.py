"""Settings for every test process, and the expensive set-ups made once per session and shared: the tiny demo data
(made by the stages), the tiny pipeline after one real `dvc repro`, and the S3 server."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, MotoServer, make_project_repo, moto, run

# MLflow's usage telemetry cannot reach its collector offline; when it gives up it unsets an environment
# variable from a background thread, which races with code reading os.environ (a KeyError in a test).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Prefect's servers (the test harness's, ours) try to send usage telemetry, which cannot leave this machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# `make test` runs on every core (pytest-xdist): each worker's torch, and the stages it starts, take their share of
# the cores rather than all of them each.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


# The longest groups, longest first, by their seconds in one `make test` (2 cores, Zen 5): prefect worker 288,
# pipeline 199, tune 75, own data 38, DVC DDP 30, checkpoint restore 28. `make test` passes --no-loadscope-reorder,
# so xdist hands out the groups in collection order: starting the longest first lets the rest fill the other
# worker (one session: 543 and 565 s before, 443 s after). Only an order: a stale list costs time, never a result.
LONGEST_GROUPS = ("test_prefect_worker", "pipeline", "test_tune", "test_own_data", "test_dvc_ddp",
                  "test_checkpoint_restore")


@pytest.hookimpl(wrapper=True)  # around xdist's own hook, which writes each test's group into its id
def pytest_collection_modifyitems(items):
    """Tests that share an expensive set-up run on one xdist worker (`--dist loadgroup`), so it is made once: every
    test of the session's pipeline repository together, and each other slow module's tests together (its
    module-scoped servers and projects). Fast tests go wherever a worker is free, after the groups."""
    longest = {name: rank for rank, name in enumerate(LONGEST_GROUPS)}
    rank = {}  # the listed groups in their order, then the other groups, then the ungrouped tests
    for item in items:
        if "pipeline" in item.fixturenames:
            group = "pipeline"
        elif item.get_closest_marker("slow") or item.get_closest_marker("integration"):
            group = item.module.__name__
        else:
            continue
        rank[item] = longest.get(group, len(longest))
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: rank.get(item, len(longest) + 1))
    yield


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_xdist_node_collection_finished(node, ids):
    """Every integration test has a group, which xdist writes into its id (`...@group`). A pytest whose ids ignore
    that rewrite (9.2 with xdist 3.8) would send a group's tests to every worker, each making the group's set-up
    again: stop, saying why, rather than run slow."""
    if node.config.getoption("dist") == "loadgroup":
        lost = [i for i in ids if i.startswith("tests/integration/") and "@" not in i]
        if lost:
            pytest.exit(f"pytest-xdist could not group {len(lost)} tests (e.g. {lost[0]}) under pytest "
                        f"{pytest.__version__}: install the versions of constraints.txt", returncode=4)


@pytest.fixture(scope="session")
def tiny_params():
    from action3d.config import load_params

    return load_params(ROOT / "params.yaml", TINY)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_params) -> Path:
    """synth -> split -> cache of both demo sets, through the stage functions, in a folder laid out as the project
    (data/demo, data/splits, data/cache); returns that folder."""
    from action3d.stages import STAGES

    root = tmp_path_factory.mktemp("tiny-data")
    cwd = os.getcwd()
    os.chdir(root)  # the stages read data.<role>.path relative to the project, as dvc.yaml runs them
    try:
        for role in ("pretrain", "finetune"):
            STAGES["synth"].run(tiny_params, role=role, out=f"data/demo/{role}")
            STAGES["split"].run(tiny_params, role=role, out=f"data/splits/{role}")
            STAGES["cache"].run(tiny_params, role=role, videos=f"data/splits/{role}/slices/0.csv",
                                out=f"data/cache/{role}/slice-0")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def workdir(tmp_path, tiny_data, monkeypatch) -> Path:
    """A project folder (with .dvc, so the MLflow store lands in it) whose data/ is the session's tiny data."""
    (tmp_path / ".dvc").mkdir()
    shutil.copytree(tiny_data / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


class Pipeline:
    """The tiny project after its first `dvc repro` (every stage, a registered champion), committed."""

    def __init__(self, repo: Path, first_output: str):
        self.repo, self.first_output = repo, first_output

    def reset(self) -> Path:
        """The repository as its baseline commit left it, whatever an earlier test changed (outputs included)."""
        run(self.repo, "git", "checkout", "-q", "--", ".")
        run(self.repo, "git", "clean", "-qfd", "--", "src")
        run(self.repo, "dvc", "checkout", "-q", check=False)
        return self.repo


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    repo = make_project_repo(tmp_path_factory.mktemp("pipeline") / "project")
    first = run(repo, "dvc", "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline run")
    return Pipeline(repo, first.stdout)


@pytest.fixture
def repo(pipeline) -> Iterator[Path]:
    """The session's pipeline repository at its baseline commit, for a test that changes it: reset before (whatever
    ran earlier) and after (a failed `dvc exp run -S` leaves its knob in params.yaml, which the next test would read)."""
    yield pipeline.reset()
    pipeline.reset()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with moto(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path) -> MotoServer:
    """The AWS variables of the moto server in os.environ for one test (and the developer's ~/.aws hidden), so that
    anything the test runs, subprocesses included, talks to moto."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the moto server (implies s3_env)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name
