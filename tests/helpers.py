"""What tests share: the tiny demo params, a project repository as users clone it, commands in the venv, real
servers on loopback (moto for S3, any HTTP server), tiny real videos. Fixtures live in the conftest files and call
these; no test imports another test module or a conftest."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's scripts sit beside its python: dvc, action3d, mlflow, moto_server
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

# The project's params.yaml with the demo shrunk to seconds of work: every stage runs for real.
TINY = [
    "synth.width=64", "synth.height=48", "synth.seconds=1.0", "synth.crf=28", "synth.sets.pretrain.looks=2",
    "synth.sets.pretrain.classes=3", "synth.sets.pretrain.train_per_class=3", "synth.sets.pretrain.val_per_class=1",
    "synth.sets.pretrain.test_per_class=1", "synth.sets.finetune.classes=3", "synth.sets.finetune.groups=10",
    "synth.sets.finetune.test_groups=3", "synth.sets.finetune.clips_per_group=1",
    "cache.short_side=40", "clip.crop_size=32", "clip.frames=8", "split.min_frames=8", "split.probe=false",
    "scratch.pretrain.epochs=2", "scratch.pretrain.warmup_epochs=1", "scratch.pretrain.batch_size=4",
    "scratch.pretrain.workers=0",
    "scratch.finetune.epochs=2", "scratch.finetune.batch_size=4", "scratch.finetune.workers=0",
    "finetune.epochs=2", "finetune.batch_size=4", "finetune.workers=0",
    "evaluate.batch_size=8", "evaluate.workers=0",
]


def write_tiny_params(folder: Path, overrides: Sequence[str] = ()) -> Path:
    """params.yaml of the project with the TINY overrides (then `overrides`) applied (comments dropped, keys kept)."""
    import yaml

    from action3d.config import apply_override

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in [*TINY, *overrides]:
        apply_override(raw, override)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(cwd: Path, *cmd: str, check: bool = True, timeout: float = 900, env: Mapping[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """A command in `cwd` with the venv's tools first on PATH and no MLFLOW_TRACKING_URI from outside."""
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    full.pop("MLFLOW_TRACKING_URI", None)
    full.update(env or {})
    done = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_project_repo(folder: Path, overrides: Sequence[str] = ()) -> Path:
    """A fresh git + DVC repository holding the project as users clone it (dvc.yaml, the package's sources, flows,
    prefect.yaml) with the tiny params (and `overrides`), committed on branch main. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("dvc.yaml", "README.md", "prefect.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, folder / name)
    for name in ("src", "flows"):
        shutil.copytree(ROOT / name, folder / name, ignore=ignore)
    write_tiny_params(folder, overrides)
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "ci@example.com"],
                 ["git", "config", "user.name", "ci"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "the project, tiny params"]):
        run(folder, *argv)
    return folder


def clone_project(source: Path, folder: Path) -> Path:
    """A copy of a project repository (its git history, its DVC cache and outputs, its MLflow store), for a test
    that changes it while others read the original."""
    shutil.copytree(source, folder, symlinks=True)
    return folder


def write_video(path: Path, frames: int = 30, *, width: int = 64, height: int = 48, seed: int = 0, fps: int = 25) -> Path:
    """A real H.264 file of a drifting noise pattern."""
    from action3d.data.video import write_video as encode

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    encode(path, (np.roll(base, 2 * t, axis=1) for t in range(frames)), fps=fps)
    return path


# --- servers on loopback -------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    pass


@contextmanager
def serve(argv: Sequence[str], *, port: int, health_path: str = "/", env: Mapping[str, str] | None = None,
          log_path: Path | None = None, timeout: float = 90.0) -> Iterator[subprocess.Popen]:
    """Run a server command until the block ends; ready once `GET http://127.0.0.1:<port><health_path>` answers.

    `env` adds to (and overrides) this process's environment. Output goes to `log_path` (default: discarded),
    whose tail is shown when the server dies or does not answer within `timeout` seconds. The server runs in its
    own process group, stopped as a whole afterwards (workers it forks too)."""
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)

    def tail() -> str:
        return log_path.read_text(errors="replace")[-3000:] if log_path else "(no log kept)"

    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ServerFailed(f"{argv[0]} exited with {process.returncode} before answering:\n{tail()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{health_path}", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers, even if not with 200
            except OSError:
                if time.monotonic() > deadline:
                    raise ServerFailed(f"{argv[0]} did not answer on port {port} within {timeout:.0f} s:\n{tail()}")
                time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if log_path:
            log.close()


# --- the project on a Prefect work pool, as users run it -------------------------------------------------------------


def run_in(cwd: Path, *argv, env: Mapping[str, str], check: bool = True, timeout: float = 900
           ) -> subprocess.CompletedProcess:
    """`argv` in `cwd` with exactly `env` (nothing of this process's environment added), as a user's shell runs it;
    an AssertionError with the output's tail when it fails and `check`."""
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=dict(env), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def pool_env(folder: Path) -> dict[str, str]:
    """The environment of a test that runs the project's flows on workers: the venv's commands first, no telemetry,
    Prefect's state and a throwaway git config under `folder`, and neither the suite's PYTHONPATH nor a tracking
    URI from outside (a worker's clone runs its own code, with the store it is given)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_HOME": str(folder / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GIT_CONFIG_GLOBAL": str(folder / "gitconfig")}
    for name in ("PYTHONPATH", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def pool_project(folder: Path, overrides: Sequence[str], bucket: str, env: Mapping[str, str]) -> tuple[Path, Path]:
    """(project, origin): the project with tiny params and `overrides`, moto's `bucket` as its DVC remote
    (committed), and `origin`, the bare clone its workers clone from."""
    project = make_project_repo(folder / "project", overrides)
    run_in(project, BIN / "action3d", "remote", "setup", f"s3://{bucket}/dvc", env=env)
    run_in(project, "git", "commit", "-qam", "the DVC remote", env=env)
    origin = folder / "origin.git"
    run_in(folder, "git", "clone", "-q", "--bare", project, origin, env=env)
    run_in(project, "git", "remote", "add", "origin", origin, env=env)
    return project, origin


@contextmanager
def prefect_pool(folder: Path, project: Path, origin: Path, env: dict[str, str], *, pool: str,
                 worker_env: Mapping[str, str] | None = None, workers: int = 2) -> Iterator[list[Path]]:
    """A Prefect server on loopback (`env` gets its PREFECT_API_URL), the gpu and cpu process pools, the project's
    deployments from `origin`, and `workers` process workers of `pool` (two machines, one flow run at a time each),
    with `worker_env` added. Yields their log files (folder/worker-<i>.log); on exit the workers stop, then the
    server."""
    port = free_port()
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    server = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with serve(server, port=port, health_path="/api/health", env=env, log_path=folder / "prefect-server.log",
               timeout=240):
        for name in ("gpu", "cpu"):
            run_in(project, BIN / "prefect", "work-pool", "create", name, "--type", "process", env=env)
        run_in(project, sys.executable, "flows/deploy.py", "--repository", origin, "--require-remote", env=env)
        started, logs = [], [folder / f"worker-{i}.log" for i in range(1, workers + 1)]
        try:
            for log in logs:
                (folder / log.stem).mkdir()
                with open(log, "wb") as out:  # the worker holds its own copy of the descriptor
                    started.append(subprocess.Popen(
                        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"],
                        cwd=folder / log.stem, env={**env, **(worker_env or {})}, stdout=out,
                        stderr=subprocess.STDOUT, start_new_session=True))
            yield logs
        finally:
            for worker in started:
                os.killpg(worker.pid, signal.SIGTERM)
            for worker in started:
                try:
                    worker.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)


@dataclass(frozen=True)
class MotoServer:
    """A moto server: its URL and the AWS variables that send boto3, DVC and MLflow to it."""

    endpoint_url: str
    port: int

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint_url, **CREDENTIALS}

    def client(self, **credentials: str):
        """A boto3 S3 client on this server; `credentials` override the test ones (aws_access_key_id=...)."""
        import boto3

        keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", **credentials}
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1", **keys)


@contextmanager
def moto(log_path: Path, env: Mapping[str, str] | None = None) -> Iterator[MotoServer]:
    """A moto server of its own (for tests that change its global state, e.g. authentication)."""
    port = free_port()
    with serve([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port=port,
               health_path="/moto-api/config", env=env, log_path=log_path):
        yield MotoServer(f"http://127.0.0.1:{port}", port)


# The MLflow server's job runners (about 2 GB of processes) serve nothing the tests use.
MLFLOW_SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextmanager
def mlflow_server(folder: Path, *, artifacts: str | None = None, env: Mapping[str, str] | None = None
                  ) -> Iterator[str]:
    """`mlflow server` on a sqlite store in `folder` (artifacts served from `artifacts`, default a folder beside
    it); yields its URL."""
    port = free_port()
    argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", artifacts or str(folder / "artifacts"), "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]
    with serve(argv, port=port, health_path="/health", env={**MLFLOW_SERVER_ENV, **(env or {})},
               log_path=folder / "server.log", timeout=120):
        yield f"http://127.0.0.1:{port}"


# --- the registry: logged runs and the flows run against sqlite (tests/unit) and a server (tests/integration) ----

KWARGS = {"n_classes": 3, "widen_factor": 0.125, "conv1_t_size": 3}
CARD = {"classes": ["a", "b", "c"], "clip_frames": 4, "stride": 1, "crop_size": 16, "short_side": 16,
        "mean": [0.45, 0.45, 0.45], "std": [0.225, 0.225, 0.225]}


def checkpoint(folder: Path, seed: int):
    """A training stage's model.pt in miniature: a seeded resnet10 with its card; (path, module)."""
    import torch

    from action3d.checkpoint import make_checkpoint, save_checkpoint
    from action3d.models import create_model

    torch.manual_seed(seed)
    model = create_model("resnet10", **KWARGS).eval()
    path = folder / f"run{seed}" / "model.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(make_checkpoint(model, extra={"card": CARD}), path)
    return path, model


def log_trained_runs(uri: str, experiment: str, folder: Path, count: int = 5) -> list:
    """`count` finetune-like runs, each logging its one model: [(run id, checkpoint, module)]."""
    from action3d.tracking.runs import start_stage_run

    made = []
    for seed in range(count):
        path, model = checkpoint(folder, seed)
        with start_stage_run("finetune", experiment=experiment, tracking_uri=uri, params={"seed": seed}) as run:
            run.log_model(path, CARD, metadata={"arch": "resnet10"})
        made.append((run.run_id, path, model))
    return made


def promotion_flow(uri: str, name: str, trained) -> None:
    """The registry rules, end to end; run against sqlite (tests/unit) and an `mlflow server` (tests/integration)."""
    import base64

    import mlflow
    import pandas as pd
    import torch
    from mlflow.tracking import MlflowClient

    from action3d.tracking import models
    from action3d.tracking.registry import CHALLENGER, CHAMPION, register_model

    client = MlflowClient(uri)

    def register(i: int, score: float, digest: str = "split-a"):
        return register_model(trained[i][0], name, metrics={"video_top1": score, "video_top5": 1.0},
                              data_digest=digest, metric_key="video_top1", tracking_uri=uri)

    def aliases(version: str) -> list[str]:
        return list(client.get_model_version(name, version).aliases)

    first = register(0, 0.50)
    assert (first.version, first.alias, first.created) == ("1", CHAMPION, True)
    worse = register(1, 0.40)
    assert (worse.version, worse.alias) == ("2", CHALLENGER) and "does not beat" in worse.reason
    again = register(1, 0.40)
    assert (again.version, again.alias, again.created) == ("2", CHALLENGER, False)
    assert len(client.search_model_versions(f"name = '{name}'")) == 2  # idempotent: no third version
    tie = register(2, 0.50)
    assert tie.alias == CHALLENGER and aliases("3") == [CHALLENGER] and aliases("2") == []  # ties keep the champion
    better = register(3, 0.70)
    assert (better.version, better.alias) == ("4", CHAMPION) and aliases("1") == []
    tags = client.get_model_version(name, "4").tags
    assert tags["metric.video_top1"] == "0.7" and tags["data_digest"] == "split-a" and "beats" in tags["promotion"]
    assert client.get_model_version(name, "4").run_id == trained[3][0]
    # another test split: 0.30 is not comparable with 0.70; the version measured on the current split takes over
    moved = register(4, 0.30, digest="split-b")
    assert moved.alias == CHAMPION and "not comparable" in moved.reason
    assert client.get_model_version_by_alias(name, CHAMPION).version in ("5", 5)

    # the champion's torch module is one call away, and its served model answers a video with class names
    mlflow.set_tracking_uri(uri)
    module = models.load_module(f"models:/{name}@champion")
    x = torch.randn(2, 3, 4, 16, 16)
    assert isinstance(module, torch.nn.Module) and not module.training
    torch.testing.assert_close(module(x), trained[4][2](x))
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    video = base64.b64encode(models.example_video(CARD)).decode()
    answer = served.predict(pd.DataFrame([{"video_b64": video}]), params={"topk": 2}).iloc[0]
    assert answer["error"] == "" and answer["label"] in CARD["classes"] and len(answer["top_classes"]) == 2




# One process of a race: for each job, wait until the other process is at the same job, then register.
RACER = """
import json, sys, time
from pathlib import Path
from action3d.tracking.registry import register_model
uri, sync, me, jobs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
done = []
for i, (name, run_id, score) in enumerate(jobs):
    (sync / f"{i}.{me}").touch()
    deadline = time.monotonic() + 120
    while len(list(sync.glob(f"{i}.*"))) < 2:
        if time.monotonic() > deadline:
            sys.exit(f"the other process never reached job {i}")
        time.sleep(0.001)
    r = register_model(run_id, name, metrics={"video_top1": score}, data_digest="split-a", metric_key="video_top1",
                       tracking_uri=uri)
    done.append([name, r.version, r.alias])
print(json.dumps(done))
"""


def race(uri: str, run_ids: list[str], prefix: str, folder, rounds) -> None:
    """Two processes register two runs into the same model at the same moment, once per (score A, score B) of
    `rounds` (a fresh model name each); then exactly one version of each is champion: the better, or on a tie the
    older. Run against sqlite (tests/unit) and an `mlflow server` (tests/integration)."""
    import json

    from mlflow.tracking import MlflowClient

    from action3d.tracking.registry import CHAMPION

    runs = run_ids[:2]
    names = [f"{prefix}-{i}" for i in range(len(rounds))]
    sync = folder / "sync"
    sync.mkdir()
    processes = [
        subprocess.Popen([sys.executable, "-c", RACER, uri, str(sync), str(who),
                          json.dumps([[name, runs[who], scores[who]] for name, scores in zip(names, rounds)])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        for who in (0, 1)
    ]  # fmt: skip
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n---\n".join(e[-3000:] for e in errors)
    client = MlflowClient(uri)
    for name, scores in zip(names, rounds):
        versions = {v.run_id: str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
        assert len(versions) == 2, (name, versions, client.search_model_versions(f"name = '{name}'"))
        champions = [v for v in versions.values() if CHAMPION in client.get_model_version(name, v).aliases]
        a, b = versions[runs[0]], versions[runs[1]]
        expected = a if scores[0] > scores[1] else b if scores[1] > scores[0] else min(a, b, key=int)
        assert champions == [expected], (name, scores, versions, champions)
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == expected


RACE_ROUNDS = [(0.4, 0.6), (0.6, 0.4), (0.5, 0.5), (0.3, 0.8), (0.8, 0.3), (0.5, 0.5), (0.2, 0.9), (0.9, 0.2)]


