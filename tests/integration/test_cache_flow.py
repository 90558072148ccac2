"""A set's cache built by two workers, as users run it: a Prefect server and two process workers of the `cpu` pool on
loopback, the project deployed from prefect.yaml, moto's S3 as the DVC remote, the cache flow (flows/cache.py)
started on the project's machine. Each worker builds one slice; the process building slice 1 is killed once and
that slice alone is run again. DVC records the result exactly as a one-machine `dvc repro` does: the same dvc.lock
entries for the same bytes, and a fresh clone that applies the experiment has nothing left to run."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import BIN, pool_env, pool_project, prefect_pool, run_in

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLICES = ["cache.slices=[0, 1]", "cache.shard_mb=0.05"]  # two slices, a few shards each


def _own_code(env: dict, clone: Path) -> dict:
    """The environment with the clone's own package first, as a worker runs a revision's code."""
    return {**env, "PYTHONPATH": str(clone / "src")}


def _cache_locks(repo: Path) -> dict:
    """cache@pretrain-<k> -> its outputs' hashes in dvc.lock."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: [(o["path"], o["md5"], o["nfiles"]) for o in spec["outs"]]
            for name, spec in stages.items() if name.startswith("cache@pretrain-")}


def _kill_once(slice_list: str, mine: str, stop: threading.Event, killed: list) -> None:
    """SIGKILL the first `action3d stage cache` process of this test's workers that builds `slice_list`."""
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
                if b"cache" in argv and slice_list.encode() in argv and any(a.endswith(b"action3d") for a in argv[:2]) \
                        and mine.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(int(proc.name))
                    return
            except OSError:
                continue
        time.sleep(0.02)


def test_two_workers_build_the_slices_and_dvc_records_them_as_one_machine_would(tmp_path, s3_bucket, s3_env):
    env = pool_env(tmp_path)
    project, origin = pool_project(tmp_path, SLICES, s3_bucket, env)

    # the reference: one machine builds both slices with `dvc repro`
    single = tmp_path / "single"
    run_in(tmp_path, "git", "clone", "-q", "-b", "main", origin, single, env=env)
    run_in(single, BIN / "dvc", "repro", "cache@pretrain-0", "cache@pretrain-1", env=_own_code(env, single))
    reference = _cache_locks(single)
    assert len(reference) == 2

    with prefect_pool(tmp_path, project, origin, env, pool="cpu") as worker_logs:
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_once, args=("data/splits/pretrain/slices/1.csv",
                                                           f"PREFECT_HOME={env['PREFECT_HOME']}", stop, killed))
        killer.start()
        try:
            flow = run_in(project, sys.executable, "flows/cache.py", "--role", "pretrain", "--name", "ci-cache",
                          env=env, timeout=900)
        finally:
            stop.set()
            killer.join()

        logs = "".join(log.read_text(errors="replace") for log in worker_logs)
        said = flow.stdout + flow.stderr  # Prefect logs the flow's prints on stderr
        assert killed, "the slice-1 build was never seen running"
        assert "2 slice(s) built on the pool" in said, said[-3000:] + logs[-3000:]
        assert "slice 1 of pretrain: flow run cache-pretrain-1-0 ended" in said
        # the work happened on the workers, one slice each, slice 1 twice (its first run killed), nothing here
        assert "Running stage 'cache@" not in said and "is cached - skipping run" in said
        ran = re.findall(r"Flow run '(cache-pretrain-\d-\d)' - Running stage '(cache@pretrain-\d)'", logs)
        assert sorted(ran) == [("cache-pretrain-0-0", "cache@pretrain-0"), ("cache-pretrain-1-0", "cache@pretrain-1"),
                               ("cache-pretrain-1-1", "cache@pretrain-1")]

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            runs = {r.name: r.state.type.value for r in client.read_flow_runs() if r.name.startswith("cache-pretrain")}
        assert runs["cache-pretrain-0-0"] == "COMPLETED" and "cache-pretrain-0-1" not in runs
        assert runs["cache-pretrain-1-0"] in ("CRASHED", "FAILED") and runs["cache-pretrain-1-1"] == "COMPLETED"

    # recorded by DVC as the one-machine build: the same entries for the same bytes, slices disjoint and complete
    assert _cache_locks(project) == reference
    from action3d.data.cache import read_index, slice_of

    indexes = [read_index(project / f"data/cache/pretrain/slice-{k}") for k in (0, 1)]
    listed = {line.split(",")[0] for name in ("train", "val", "test")
              for line in (project / f"data/splits/pretrain/{name}.csv").read_text().splitlines()[1:]}
    assert not set(indexes[0]) & set(indexes[1]) and set(indexes[0]) | set(indexes[1]) == listed
    assert all(slice_of(path, 2) == k for k in (0, 1) for path in indexes[k])

    # a laptop: the experiment from origin, its data from S3, nothing to run
    laptop = tmp_path / "laptop"
    run_in(tmp_path, "git", "clone", "-q", "-b", "main", origin, laptop, env=env)
    mine = _own_code(env, laptop)
    run_in(laptop, BIN / "dvc", "exp", "pull", "origin", "ci-cache", env=mine)
    run_in(laptop, BIN / "dvc", "exp", "branch", "ci-cache", "cache-built", env=mine)
    run_in(laptop, "git", "checkout", "-q", "cache-built", env=mine)
    run_in(laptop, BIN / "dvc", "pull", "cache@pretrain-0", "cache@pretrain-1", env=mine)
    again = run_in(laptop, BIN / "dvc", "repro", "cache@pretrain-0", "cache@pretrain-1", env=mine)
    assert "Running stage" not in again.stdout, again.stdout
    assert _cache_locks(laptop) == reference
