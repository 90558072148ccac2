"""The DVC workspace, driven from Python: the pipeline's stages, `dvc repro` of one of them, the remote, experiments.

Prefect flows (flows/), tuning and the tests run the pipeline through here and never re-type `dvc.yaml`: DVC decides
what is stale, records `dvc.lock` and caches the outputs. Commands run as subprocesses of this same venv (its
`dvc` and `action3d` first on PATH) with the workspace's own `src/` first on PYTHONPATH, so a worker's fresh clone
runs the code of the revision it checked out, not whatever the worker's venv was installed from.

What reads the repository goes through DVC's Python API (`dvc.repo.Repo`: the stage graph, status, outputs and their
cache listings, metrics, config). What runs stages or moves data (`repro`, `pull`, `push`, `exp save`, `exp push`)
is the `dvc` command on purpose: a stage's training must be a process of its own that a cancelled flow stops with its
process group, its output streams into the flow's log as it comes, and DVC changes the working directory and holds
repository locks for the whole call, which a long-lived flow process must not inherit. Nothing parses their output:
which stage commands ran, each says itself (`RAN_LOG`).

    ws = Workspace(".")
    ws.check(overrides=["finetune.lr=0.01"], targets=["finetune"], remote=True)  # fails before any work starts
    ws.set_params(["finetune.lr=0.01"])          # as `dvc exp run -S`: params.yaml edited, comments kept
    for stage in ws.stages():
        ws.repro(stage, pull=True)               # skipped when up to date; missing inputs pulled from the remote
    ws.save_experiment("nightly-2026-11-30")    # `dvc exp save`: params, metrics and outputs as an experiment
    ws.push_experiment("nightly-2026-11-30")    # `dvc exp push origin`: git ref + outputs to the DVC remote
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from action3d.atomic import write_atomic_text
from action3d.config import ParamsError, apply_override, flatten, load_params
from action3d.errors import Action3dError
from action3d.stages import RAN_LOG

# the fix every "no usable DVC remote" error suggests
SETUP_HINT = "run `action3d remote setup s3://BUCKET/PREFIX` in the project (then commit .dvc/config)"


def _exact_float(representer, value):
    """ruamel's float layout, except for full-precision floats, which it writes back with other last digits
    (2.2132008552811133e-05 as ...132e-05, the same double): those in Python's shortest repr, as they were written.
    A value nobody overrode must come back as it was."""
    from ruamel.yaml.representer import RoundTripRepresenter

    node = RoundTripRepresenter.represent_scalar_float(representer, value)
    mantissa = re.split(r"[eE]", node.value)[0]
    if len(re.sub(r"\D", "", mantissa).lstrip("0")) >= 16:
        node.value = repr(float(value))
    return node


class WorkspaceError(Action3dError):
    """A DVC or git command failed, or the workspace lacks what a run needs; the message says which and the fix."""


def deploy_source() -> dict[str, object]:
    """What `prefect deploy` puts in the deployments (prefect.yaml's build step `source`): the git repository and
    branch workers clone, and whether the schedules start active. ACTION3D_GIT_REPOSITORY, ACTION3D_GIT_BRANCH and
    ACTION3D_SCHEDULES_ACTIVE set them; unset, they are this project's `origin` (or this folder, for a worker on
    the same machine), its current branch, and paused schedules."""
    root = Path.cwd()

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    repository = os.environ.get("ACTION3D_GIT_REPOSITORY") or git("remote", "get-url", "origin") or str(root)
    branch = os.environ.get("ACTION3D_GIT_BRANCH") or git("branch", "--show-current")
    if not branch:
        raise WorkspaceError(f"{root} is on no branch (a detached HEAD), and workers clone a branch: check one out, "
                             "or set ACTION3D_GIT_BRANCH")
    active = os.environ.get("ACTION3D_SCHEDULES_ACTIVE", "false").strip().lower() in ("1", "true", "yes")
    return {"repository": repository, "branch": branch, "schedules_active": active}


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    endpoint_url: str | None


@dataclass
class Workspace:
    """A git + DVC checkout of the project (where dvc.yaml and params.yaml are)."""

    root: Path
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES of one study entry

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if not (self.root / "dvc.yaml").is_file():
            raise WorkspaceError(f"{self.root}: no dvc.yaml here. Run from the project's folder (a clone of its git "
                                 "repository), or pass the folder that holds dvc.yaml")

    # ------------------------------------------------------------------------------------------------ commands

    def env(self) -> dict[str, str]:
        """This process's environment with the venv's tools first and the workspace's source first."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        src = self.root / "src"
        if src.is_dir():
            env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        env.setdefault("DVC_NO_ANALYTICS", "1")
        return {**env, **self.extra_env}

    def run(self, *argv: str, check: bool = True, echo: bool = False, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run a command in the workspace. `echo` streams its output (a training stage's epochs) as it comes;
        `env` adds variables for this command alone."""
        command = [str(a) for a in argv]
        environment = {**self.env(), **(env or {})}
        if echo:
            lines: list[str] = []
            with subprocess.Popen(command, cwd=self.root, env=environment, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
                for line in process.stdout:
                    print(line, end="", flush=True)
                    lines.append(line)
            done = subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")
        else:
            done = subprocess.run(command, cwd=self.root, env=environment, capture_output=True, text=True)
        if check and done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise WorkspaceError(f"`{' '.join(command)}` failed with exit code {done.returncode} in {self.root}:\n"
                                 f"{tail}")
        return done

    # ---------------------------------------------------------------------------------------------- pipeline

    def stages(self, targets: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The stages of dvc.yaml in its order (foreach items expanded: `split@pretrain`); with `targets`, only
        those and the stages upstream of them (what `dvc repro TARGET...` may run)."""
        from dvc.repo import Repo
        from dvc.stage import PipelineStage

        with Repo(str(self.root)) as repo:
            named = {s.name: s for s in repo.index.stages if isinstance(s, PipelineStage)}  # not .dvc files
            listed = list(named)
            if not targets:
                return listed
            unknown = [t for t in targets if t not in named]
            if unknown:
                raise WorkspaceError(f"no stage {', '.join(map(repr, unknown))} in {self.root / 'dvc.yaml'}; the "
                                     f"stages are: {', '.join(listed)}")
            graph = repo.index.graph  # an edge runs from a stage to one it depends on
            needed, todo = set(targets), [named[t] for t in targets]
            while todo:  # everything upstream of the targets
                for before in graph.successors(todo.pop()):
                    if getattr(before, "name", None) not in needed:
                        needed.add(getattr(before, "name", None))
                        todo.append(before)
        return [name for name in listed if name in needed]

    def set_params(self, overrides: list[str] | tuple[str, ...]) -> None:
        """Write dotted overrides into params.yaml, as `dvc exp run -S` does: comments and order kept. Validated
        first, so a bad key changes nothing."""
        if overrides:
            write_atomic_text(self.root / "params.yaml", self.render_params(overrides))

    def render_params(self, overrides: list[str] | tuple[str, ...]) -> str:
        """params.yaml's text with the dotted overrides written in (validated first); the file is not touched."""
        path = self.root / "params.yaml"
        load_params(path, overrides)
        from ruamel.yaml import YAML
        from ruamel.yaml.scalarfloat import ScalarFloat

        yaml = YAML()  # round-trip: the file keeps its comments, quotes and line layout
        yaml.preserve_quotes, yaml.width = True, 4096
        yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
        yaml.representer.add_representer(ScalarFloat, _exact_float)
        data = yaml.load(path.read_text())
        for override in overrides:
            apply_override(data, override)
        buffer = io.StringIO()
        yaml.dump(data, buffer)
        return buffer.getvalue()

    def repro(self, stage: str, *, pull: bool = False, single: bool = False, force: bool = False,
              env: dict[str, str] | None = None) -> list[str]:
        """`dvc repro STAGE` (and whatever upstream is stale); returns the stages whose command ran, [] when up to
        date or restored from DVC's run cache (each `action3d stage` command reports itself: a stage whose command
        is something else never shows here).
        `pull`: outputs of up-to-date stages and missing inputs come from the DVC remote instead of being made.
        `single`: this stage alone (`--single-item`), for callers that run the stages in order themselves. `force`:
        run its command even if DVC has its result (a multi-node stage's other nodes wait for this one to join).
        `env`: variables for the stage's command (a multi-node stage's rendezvous)."""
        argv = ["dvc", "repro", *(["--pull"] if pull else []), *(["--single-item"] if single else []),
                *(["--force"] if force else []), stage]
        with tempfile.TemporaryDirectory() as tmp:  # each stage command that runs names itself there
            log = Path(tmp) / "ran"
            self.run(*argv, echo=True, env={**(env or {}), RAN_LOG: str(log)})
            return list(dict.fromkeys(log.read_text().split())) if log.is_file() else []  # a restart: once

    def is_current(self, stage: str) -> bool:
        """Whether dvc.lock's entry for `stage` matches its command, deps and params here: its outputs are then the
        lock's, to pull rather than to make (missing local outputs do not count)."""
        from dvc.repo import Repo

        with Repo(str(self.root)) as repo:  # the target as a path: DVC reads a bare name relative to the cwd
            found = repo.status(targets=[f"{self.root / 'dvc.yaml'}:{stage}"])
        changes = [change for stage_changes in found.values() for change in stage_changes]
        return all(isinstance(change, dict) and set(change) == {"changed outs"} for change in changes)

    def stage_command(self, stage: str) -> tuple[str, list[str]]:
        """A stage's command as dvc.yaml gives it, and the DVC targets whose outputs are its inputs (the stages
        and .dvc files it depends on): what another machine pulls to run the same command outside DVC."""
        from dvc.repo import Repo

        with Repo(str(self.root)) as repo:
            found = repo.stage.collect(stage)
            if len(found) != 1:
                raise WorkspaceError(f"no single stage {stage!r} in {self.root / 'dvc.yaml'}")
            inputs = sorted(s.addressing for s in repo.index.graph.successors(found[0]))
            return found[0].cmd, inputs

    def locate(self, md5s: set[str]) -> dict[str, list[str]]:
        """Where each file md5 is an output in dvc.lock: `path (stage)`, looking inside directory outputs through
        their listings in the local DVC cache. The link from a run's data digests to the data to check out."""
        from dvc.repo import Repo

        found: dict[str, list[str]] = {}
        with Repo(str(self.root)) as repo:
            for out in repo.index.outs:
                if not (out.hash_info and out.hash_info.value) or not getattr(out.stage, "name", None):
                    continue  # not made by a stage of dvc.lock (a .dvc file's), or not made yet
                files = {out.hash_info.value: out.def_path}
                if out.hash_info.isdir:
                    with contextlib.suppress(Exception):  # its listing not in the local cache: the directory alone
                        files = {info.value: "/".join([out.def_path, *key]) for key, _, info in out.get_dir_cache()}
                for digest in md5s & files.keys():
                    found.setdefault(digest, []).append(f"{files[digest]} (stage {out.stage.name})")
        return found

    def metrics(self) -> dict[str, float]:
        """`dvc metrics show`: the workspace's metrics as flat dotted keys (`finetune.video_top1`)."""
        from dvc.repo import Repo

        with Repo(str(self.root)) as repo:
            shown = repo.metrics.show()
        flat: dict[str, float] = {}
        for revision in shown.values():  # one: the workspace
            for files in revision.get("data", {}).values():
                flat.update(flatten(files.get("data", {})))
        return flat

    # ------------------------------------------------------------------------------------------ DVC remote

    def remote(self) -> Remote | None:
        """The default DVC remote, or None."""
        config = self._dvc_config()
        name = config.get("core", {}).get("remote")
        if not name or name not in config.get("remote", {}):
            return None
        remote = config["remote"][name]
        return Remote(name, remote["url"], remote.get("endpointurl"))

    def _dvc_config(self, level: str | None = None) -> dict:
        """DVC's configuration as DVC merges it (system, global, project, local), or one `level` of it."""
        from dvc.config import Config

        config = Config(dvc_dir=str(self.root / ".dvc"))
        return config.read(level) if level else config

    def setup_remote(self, url: str, *, name: str = "storage", local: bool = False) -> Remote:
        """Make `url` (s3://bucket/prefix) the default DVC remote, with the S3 endpoint of the environment
        (AWS_ENDPOINT_URL...) so that every clone talks to the same server; checks the bucket answers first."""
        from action3d.storage import S3Config, check_bucket, dvc_remote_commands

        config = S3Config.from_env()
        check_bucket(url, config=config)
        for command in dvc_remote_commands(url, name=name, local=local, config=config):
            self.run(*command)
        return self.remote()

    def check_remote(self, *, shared: bool = False) -> Remote:
        """The default remote, reachable; else a WorkspaceError/StorageError that says what to fix. `shared`: it
        must be in .dvc/config (what a clone gets), not only in this machine's .dvc/config.local."""
        remote = self.remote()
        if remote is None:
            raise WorkspaceError(f"{self.root}: no DVC remote is configured, so a worker cannot get the data: "
                                 f"{SETUP_HINT}")
        if shared and not self._dvc_config("repo").get("core", {}).get("remote"):
            raise WorkspaceError(f"DVC remote {remote.name!r} is set in .dvc/config.local only, which clones do not "
                                 f"get: {SETUP_HINT}")
        if remote.url.startswith("s3://"):
            from action3d.storage import S3Config, check_bucket

            check_bucket(remote.url, config=S3Config.from_env(endpoint_url=remote.endpoint_url))
        elif "://" not in remote.url and not (self.root / remote.url).exists() and not Path(remote.url).exists():
            raise WorkspaceError(f"DVC remote {remote.name!r} is the folder {remote.url}, which does not exist "
                                 f"here: create it or {SETUP_HINT}")
        return remote

    # ------------------------------------------------------------------------------------- git and experiments

    def commit(self) -> str:
        return self.run("git", "rev-parse", "HEAD").stdout.strip()

    def checkout(self, revision: str) -> str:
        """Check out a branch, tag or commit (fetched from origin when not here); returns the commit."""
        found = self.run("git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
        if found.returncode != 0 and self.has_git_remote("origin"):
            # a worker's clone is shallow and has one branch: fetch the revision itself (branch, tag or commit)
            fetched = self.run("git", "fetch", "--quiet", "origin", revision, check=False)
            if fetched.returncode == 0:
                found = self.run("git", "rev-parse", "--verify", "--quiet", "FETCH_HEAD^{commit}", check=False)
            elif "couldn't find remote ref" not in fetched.stderr and "not our ref" not in fetched.stderr:
                raise WorkspaceError(f"cannot fetch {revision!r} from origin: {fetched.stderr.strip()[-300:]}. "
                                     "Check that origin is reachable from this machine")
        if found.returncode != 0:
            branches = [b for b in self.run("git", "branch", "-a", "--format=%(refname:short)", check=False)
                        .stdout.splitlines() if b and not b.startswith("(")]  # not "(HEAD detached at ...)"
            raise WorkspaceError(f"git revision {revision!r} does not exist in {self.root} or its origin. Push it "
                                 f"first, or pick one of: {', '.join(branches) or '(no branches)'}")
        self.run("git", "checkout", "--quiet", found.stdout.strip())
        self.run("dvc", "checkout", "--quiet", check=False)  # the data of that revision, where the cache has it
        return found.stdout.strip()

    def has_git_remote(self, name: str = "origin") -> bool:
        return name in self.run("git", "remote", check=False).stdout.split()

    def ready_for_pool(self, revision: str | None = None) -> str | None:
        """What a flow that hands work to a pool's workers needs here first: a DVC remote every worker reaches, a
        git remote `origin` they clone from, and `revision` checked out (its commit returned; None when not given).
        A WorkspaceError names what is missing."""
        self.check_remote(shared=True)
        if not self.has_git_remote("origin"):
            raise WorkspaceError(f"{self.root} has no git remote 'origin': the workers clone the revision from there")
        return self.checkout(revision) if revision else None

    def save_experiment(self, name: str, stages: list[str] | tuple[str, ...] = ()) -> None:
        """`dvc exp save -n NAME`: the workspace's params, metrics and outputs as an experiment on HEAD; `stages`
        limits it to the stages a run made (the others' outputs may not be in this workspace).

        DVC's commit of it also holds its own scratch file (.dvc/tmp/repro.dat, the packed arguments of the save):
        the experiment is committed again without it, so that an experiment holds what a run made and nothing else.
        """
        self._ensure_git_identity()
        self.run("dvc", "exp", "save", "--force", "--name", name, *stages)
        ref = next((r for r in self.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
                    if r.rsplit("/", 1)[-1] == name), None)
        scratch = ".dvc/tmp/repro.dat"
        if ref is None or not self.run("git", "ls-tree", "--name-only", ref, scratch).stdout.strip():
            return
        index = {"GIT_INDEX_FILE": str(self.root / ".git" / "action3d-exp-index")}
        self.run("git", "read-tree", ref, env=index)
        self.run("git", "rm", "--cached", "--quiet", scratch, env=index)
        tree = self.run("git", "write-tree", env=index).stdout.strip()
        Path(index["GIT_INDEX_FILE"]).unlink(missing_ok=True)
        message = self.run("git", "log", "-1", "--format=%B", ref).stdout
        parents = [a for p in self.run("git", "log", "-1", "--format=%P", ref).stdout.split() for a in ("-p", p)]
        commit = self.run("git", "commit-tree", tree, *parents, "-m", message.strip()).stdout.strip()
        self.run("git", "update-ref", ref, commit)

    def experiment_ref(self, name: str) -> str:
        """The git ref of experiment `name` here (refs/exps/.../name): what another clone fetches to check it out."""
        refs = self.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
        found = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
        if not found:
            raise WorkspaceError(f"no DVC experiment {name!r} in {self.root}")
        return found[0]

    def push_experiment(self, name: str, git_remote: str = "origin", *, cache: bool = True) -> None:
        """`dvc exp push`: the experiment's git ref to `git_remote`; with `cache`, its outputs and the stages' run
        cache to the default DVC remote (so another worker restores those stages instead of running them)."""
        self.run("dvc", "exp", "push", "--force", *(["--run-cache"] if cache else ["--no-cache"]), git_remote, name)

    def _ensure_git_identity(self) -> None:
        # a fresh worker has no git identity; an experiment is a commit and needs one
        if not self.run("git", "config", "user.email", check=False).stdout.strip():
            self.run("git", "config", "user.email", "worker@action3d.invalid")
            self.run("git", "config", "user.name", "action3d worker")

    # ------------------------------------------------------------------------------------------- preflight

    def check_tracking_store(self) -> str:
        """The tracking store a run here would use, when it outlives this folder; else a WorkspaceError. A deployed
        flow runs in a temporary clone: a sqlite store inside it (MLflow's default here, with no
        MLFLOW_TRACKING_URI) would be deleted with the clone, and the run's MLflow runs and registrations lost."""
        from action3d.project import shareable_uri, sqlite_path, tracking_uri

        uri = tracking_uri(self.root)
        db = sqlite_path(uri)
        if db is not None and db.resolve().is_relative_to(self.root):
            raise WorkspaceError(
                f"this run would track into {db.name} inside the worker's temporary clone ({self.root}), which is "
                "deleted when the run ends: its MLflow runs and registered versions would be lost. Start the worker "
                "with MLFLOW_TRACKING_URI set to a store that outlives it: an MLflow server, or on the project's "
                "own machine its sqlite file (`make worker` sets sqlite:///<project>/mlflow.db)")
        return shareable_uri(uri, self.root)

    def check(self, *, overrides: list[str] | tuple[str, ...] = (), targets: list[str] | tuple[str, ...] = (),
              remote: bool = False) -> list[str]:
        """Everything a run needs, checked before any work: params with the overrides, the targets (stage names),
        and the DVC remote when asked. Returns the stages to run, in order."""
        try:
            load_params(self.root / "params.yaml", overrides)
        except ParamsError as err:
            raise WorkspaceError(str(err)) from None
        stages = self.stages(targets)
        if remote:
            self.check_remote()
        return stages
