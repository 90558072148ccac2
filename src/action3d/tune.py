"""Hyperparameter tuning with Optuna: each trial runs a training stage's own function with sampled overrides.

    action3d tune                          # params.yaml's tune section: target stage, space, trials, sampler, pruner
    action3d tune --n-workers 2            # two processes on one study (a journal file is safe for that)
    action3d tune --apply                  # write the best trial's knobs into params.yaml (the diff is shown)

The target stage (`tune.target`: finetune, scratch@finetune or scratch@pretrain) runs as `dvc repro` runs it: its
own function, on the pipeline's inputs (`stages.training_inputs`; run `dvc repro <target>` first), writing into
runs/tune/<study>/trial-<n>/ instead of its own folder. Every epoch reports `tune.metric` to the pruner, which may
stop the trial; the trial's value is the metric of the epoch the stage keeps as model.pt (`keep`: the last, or the
best).

Storage: a journal file (runs/tune/<study>.journal) by default, safe for several processes on one machine; any
RDB URL (PostgreSQL) for many machines. A trial whose worker died (its heartbeat silent for `tune.grace_period`
seconds, or on this machine its process gone) is marked failed and its knobs queued again, with its folder: it
resumes from that trial's checkpoint. On an RDB storage that is Optuna's own heartbeat and
RetryHeartbeatStaleTrialCallback; Optuna 5's journal storage has no heartbeat, so for it a thread writes the beat as
a user attribute and `requeue_dead_trials` does the rest, through the storage's public API.

MLflow: the study is a parent run (`tune-<study>`); each trial is the stage's own run, nested under it, with its
knobs, per-epoch metrics and tags trial / trial_state (COMPLETE, PRUNED, FAIL); the parent gets the best knobs,
the optimisation history and the parameter importances as PNG files.

Until `tune.startup_trials` trials have finished, TPE samples at random and the median pruner prunes nothing: a
study of that many trials or fewer is a random search without pruning (`action3d tune` says so when it starts).

This module alone imports optuna.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from action3d.atomic import write_atomic_text
from action3d.config import Params, load_params
from action3d.distributed import visible_gpus
from action3d.errors import Action3dError
from action3d.progress import say
from action3d.project import shareable_uri, tracking_uri
from action3d.stages import STAGES, RunContext, training_inputs

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did


class TuneError(Action3dError):
    """Tuning cannot start or go on: the message names the key, URL or study and the fix."""


@dataclass(frozen=True)
class Setup:
    """Everything a tuning worker needs, from params.yaml and the command line."""

    root: Path  # the project (dvc.yaml, params.yaml)
    params_path: Path
    overrides: tuple[str, ...]  # the command line's -S, under every trial's own
    params: Params

    @property
    def tune(self):
        return self.params.tune

    @property
    def study_name(self) -> str:
        return self.tune.study or self.tune.target

    @property
    def storage_url(self) -> str:
        return self.tune.storage or str(self.root / "runs" / "tune" / f"{self.study_name}.journal")

    @property
    def optuna_heartbeat(self) -> bool:
        """An RDB storage: Optuna's heartbeat and retry watch the trials (its journal storage has neither)."""
        return "://" in self.storage_url

    @property
    def out_dir(self) -> Path:
        return self.root / "runs" / "tune" / self.study_name


def setup(params_path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Setup:
    params_path = Path(params_path).resolve()
    params = load_params(params_path, overrides)
    if not params.tune.space:
        raise TuneError(f"{params_path}: tune.space is empty: add the knobs to search, e.g.\n  tune:\n    space:\n"
                        "      finetune.lr: {type: float, low: 0.001, high: 0.1, log: true}")
    return Setup(params_path.parent, params_path, tuple(overrides), params)


# --------------------------------------------------------------------------------------------- the study


def storage(s: Setup):
    """The Optuna storage: a journal file (default) or an RDB URL, reachable, or a TuneError naming it."""
    url = s.storage_url
    if not s.optuna_heartbeat:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    grace = max(2, int(s.tune.grace_period))
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9: noise for our users
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=max(1, grace // 10),
                grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None))
    except Exception as err:  # noqa: BLE001 - sqlalchemy's many connection errors: one message
        shown = shareable_uri(url)
        raise TuneError(f"cannot open the Optuna storage {shown}: {str(err).splitlines()[0]}. Check that the "
                        "database server is up and the URL (tune.storage) is right") from None


def sampler(s: Setup, worker: int = 0, trials: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded by `seed`, the worker's number and the `trials` the study holds already: one worker on a new study is
    reproducible, and workers on one study (or one restarted on it) do not draw the very same knobs."""
    seed = s.params.seed + 1000 * worker + 7919 * trials
    if s.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.tune.startup_trials)


def pruner(s: Setup) -> optuna.pruners.BasePruner:
    if s.tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, s.tune.warmup_epochs), max_resource=_epochs(s))
    return optuna.pruners.MedianPruner(n_startup_trials=s.tune.startup_trials, n_warmup_steps=s.tune.warmup_epochs)


def _epochs(s: Setup) -> int:
    stage, _, role = s.tune.target.partition("@")
    return s.params.training(stage, role).epochs


def open_study(s: Setup, worker: int = 0, store: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create the study, or load it; a study of that name optimising the other way is an error."""
    store = store or storage(s)
    existing = next((x.n_trials for x in optuna.get_all_study_summaries(store, include_best_trial=False)
                     if x.study_name == s.study_name), 0)
    try:
        study = optuna.create_study(study_name=s.study_name, storage=store, sampler=sampler(s, worker, existing),
                                    pruner=pruner(s),
                                    direction=s.tune.direction, load_if_exists=True)
    except ValueError as err:
        raise TuneError(f"Optuna study {s.study_name!r} in {shareable_uri(s.storage_url)}: {err}. Name another study "
                        "(tune.study) or use the direction it was made with") from None
    wanted = optuna.study.StudyDirection.MAXIMIZE if s.tune.direction == "maximize" else (
        optuna.study.StudyDirection.MINIMIZE)
    if study.direction != wanted:
        raise TuneError(f"Optuna study {s.study_name!r} in {shareable_uri(s.storage_url)} exists and is set to "
                        f"{study.direction.name.lower()}, not {s.tune.direction}: name another study (tune.study) "
                        "or set tune.direction to match")
    return study


def suggest(trial: optuna.Trial, s: Setup) -> list[str]:
    """The trial's overrides (`finetune.lr=0.0123`), sampled from tune.space."""
    overrides = []
    for key, dist in s.tune.space.items():
        if dist.type == "categorical":
            value = trial.suggest_categorical(key, dist.choices)
        elif dist.type == "int":
            value = trial.suggest_int(key, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log)
        else:
            value = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        overrides.append(f"{key}={_yaml_value(value)}")
    return overrides


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


# ------------------------------------------------------------------------------------- the target stage


def run_stage(s: Setup, params: Params, ctx: RunContext, out_dir: Path) -> dict:
    """The target stage's own function on the pipeline's inputs, with `params`, writing into `out_dir`."""
    stage = STAGES[s.tune.target.partition("@")[0]]
    inputs = {k: v if k == "role" else s.root / v for k, v in training_inputs(s.tune.target, params).items()}
    return stage.run(params, ctx=ctx, out=out_dir, **inputs)


# ------------------------------------------------------------------------------------------------ trials


def objective(s: Setup, parent_run_id: str | None):
    def run_trial(trial: optuna.Trial) -> float:
        overrides = suggest(trial, s)
        params = load_params(s.params_path, [*s.overrides, *overrides])  # a bad combination fails the trial, clearly
        # a trial's own folder; a re-queued trial takes over the folder (and checkpoint) of the one it retries
        folder = trial.user_attrs.get("folder") or f"trial-{trial.number}"
        trial.set_user_attr("folder", folder)
        trial.set_user_attr("overrides", overrides)

        reported: dict[int, float] = {}  # epoch -> metric, as this process trained them

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if s.tune.metric not in metrics:
                raise TuneError(f"tune.metric {s.tune.metric!r} is not a metric of {s.tune.target}'s epochs: "
                                f"choose one of {', '.join(sorted(metrics))}")
            reported[epoch] = float(metrics[s.tune.metric])
            trial.report(reported[epoch], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{s.tune.metric} {metrics[s.tune.metric]:.4g} at epoch {epoch}")

        ctx = RunContext(tags={**params.tracking.tags, "study": s.study_name, "trial": str(trial.number)},
                         parent_run_id=parent_run_id, on_epoch=report)
        say(f"[tune] trial {trial.number}: {' '.join(overrides)}")
        if s.optuna_heartbeat:  # who runs it; Optuna's heartbeat tells a live trial from a dead one
            trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
            beat = contextlib.nullcontext()
        else:
            beat = _heartbeat(trial, s.tune.grace_period)
        try:
            with beat:
                result = run_stage(s, params, ctx, s.out_dir / folder)
        except optuna.TrialPruned:
            _trial_state(ctx.run_id, "PRUNED")
            raise
        except Exception:
            _trial_state(ctx.run_id, "FAIL")
            raise
        _trial_state(ctx.run_id, "COMPLETE")
        # a resumed trial reports only the epochs it trained; the stage's history has them all
        history = {int(row.get("epoch", i + 1)): float(row[s.tune.metric])
                   for i, row in enumerate(ctx.history) if s.tune.metric in row}
        for epoch, value in history.items():  # epochs a resumed trial did not train here: on the record too
            if epoch not in reported:
                trial.report(value, epoch)
        # the trial's value: the metric of the epoch the stage keeps as its model (its `keep` knob), what a user of
        # these knobs would get
        history = history or reported
        return history.get(result.get("kept_epoch"), history[max(history)])

    return run_trial


@contextlib.contextmanager
def _heartbeat(trial: optuna.Trial, grace_period: float):
    """Who runs the trial, and a beat every grace_period / 10 seconds from a thread while it runs (an epoch may
    take longer than the grace period): how other workers tell a live trial from one whose worker died."""
    stop = threading.Event()

    def beat() -> None:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()})

    def loop() -> None:
        while not stop.wait(max(1.0, grace_period / 10)):
            try:
                beat()
            except Exception:  # noqa: BLE001 - the trial was finished elsewhere or the storage hiccuped: next beat
                pass

    beat()
    thread = threading.Thread(target=loop, name=f"trial-{trial.number}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)  # a storage write that hangs must not hold the trial's end


def _trial_state(run_id: str | None, state: str) -> None:
    if run_id:
        from action3d.tracking.runs import tag_run

        tag_run(run_id, {"trial_state": state}, tracking_uri=tracking_uri(),
                status={"PRUNED": "KILLED", "FAIL": "FAILED"}.get(state))


def requeue_dead_trials(study: optuna.Study, store: optuna.storages.BaseStorage, grace_period: float) -> list[int]:
    """Mark running trials whose worker is gone as failed and queue their knobs again; returns their numbers.
    `store` is the study's storage (a journal's: an RDB storage does this itself, with Optuna's heartbeat).

    A trial is dead when its worker was on this machine and its process no longer exists, or when its heartbeat
    has been silent for `grace_period` seconds. Only the worker whose FAIL write wins re-queues it (Optuna
    refuses to finish a trial twice), so a dead trial is run again exactly once. The retry resumes from the dead
    trial's checkpoint: same knobs, same folder, same resume key.
    """
    requeued = []
    study_id = store.get_study_id_from_name(study.study_name)
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = frozen.user_attrs.get("worker") or {}
        local = worker.get("host") == socket.gethostname()
        gone = local and not _alive(worker.get("pid"))
        silent = time.time() - worker.get("beat", frozen.datetime_start.timestamp()) > grace_period
        if not (gone or silent):
            continue
        try:
            store.set_trial_state_values(store.get_trial_id_from_study_id_trial_number(study_id, frozen.number),
                                         TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another worker finished or failed it first
            continue
        folder = frozen.user_attrs.get("folder", f"trial-{frozen.number}")
        study.enqueue_trial(frozen.params, user_attrs={"retry_of": frozen.number, "folder": folder})
        requeued.append(frozen.number)
        say(f"[tune] trial {frozen.number} lost its worker ({'process gone' if gone else 'heartbeat silent'}):"
            " queued again")
    return requeued


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def work(s: Setup, parent_run_id: str | None, worker: int = 0) -> None:
    """One worker: trials until the study holds `tune.trials` finished ones (over every worker) or time runs out."""
    store = storage(s)
    study = open_study(s, worker, store)
    callbacks = [optuna.study.MaxTrialsCallback(s.tune.trials, states=FINISHED), _announce]
    if not s.optuna_heartbeat:  # a journal: this module's heartbeat and re-queueing

        def requeue(study: optuna.Study, _trial) -> None:  # a worker that died mid-study: its trial goes on here
            requeue_dead_trials(study, store, s.tune.grace_period)

        requeue(study, None)
        callbacks.append(requeue)

    if _finished(study) < s.tune.trials:
        # a trial that fails (bad knobs, a diverged loss, out of GPU memory) is a failed trial, not a dead study
        study.optimize(objective(s, parent_run_id), n_trials=s.tune.trials, timeout=s.tune.timeout,
                       callbacks=callbacks, catch=(Action3dError, RuntimeError, ValueError),
                       gc_after_trial=True)


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _announce(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    value = "" if trial.value is None else f" = {trial.value:.4g}"
    epochs = max(trial.intermediate_values, default=0)
    say(f"[tune] trial {trial.number} {trial.state.name.lower()}{value} after {epochs} epochs "
        f"({_finished(study)} finished)")


# ------------------------------------------------------------------------------------------- the command


EPOCH_METRICS = ("val_video_top1", "val_video_top5", "val_top1", "val_loss", "val_mean_class_accuracy",
                 "train_top1", "train_loss")  # what the engine reports after every epoch (val_*: with a val split)


def preflight(s: Setup) -> None:
    """Before any trial: the metric exists, every space key matters to the target and every categorical choice is
    a valid value, the target's inputs exist, the storage answers, the study's direction agrees."""
    if s.tune.metric not in EPOCH_METRICS:
        raise TuneError(f"tune.metric {s.tune.metric!r} is not reported by the training stages after each epoch: "
                        f"choose one of {', '.join(EPOCH_METRICS)}")
    stage, _, role = s.tune.target.partition("@")
    reads = [section.format(role=role) for section in STAGES[stage].reads]
    for key, dist in s.tune.space.items():
        if not any(key == p or key.startswith(f"{p}.") for p in reads):
            raise TuneError(f"tune.space key {key!r} does not change {s.tune.target} (it reads {', '.join(reads)}): "
                            "search its own knobs, or set tune.target")
        for choice in dist.choices or []:
            try:
                load_params(s.params_path, [*s.overrides, f"{key}={_yaml_value(choice)}"])
            except Action3dError as err:
                raise TuneError(f"tune.space {key!r}: the choice {choice!r} is not a valid value: {err}") from None
    missing = [str(s.root / v) for k, v in training_inputs(s.tune.target, s.params).items()
               if k != "role" and not (s.root / v).exists()]
    if missing:
        raise TuneError(f"tuning {s.tune.target} needs its inputs ({', '.join(missing)} missing): run "
                        f"`dvc repro {s.tune.target}` first")
    if s.tune.trials <= s.tune.startup_trials and s.tune.pruner != "none":
        say(f"[tune] note: tune.trials ({s.tune.trials}) <= tune.startup_trials ({s.tune.startup_trials}): every trial "
            "is a startup trial, sampled at random and never pruned. Raise tune.trials or lower tune.startup_trials "
            "for TPE and pruning to act")
    open_study(s)


@contextlib.contextmanager
def parent_run(s: Setup):
    """The study's MLflow run, made before its trials so that they nest under it: tuning knobs and space as params;
    it ends FINISHED, or FAILED when the block raises."""
    from action3d.tracking.runs import create_parent_run, finish_run

    knobs = {f"tune.{k}": v for k, v in s.tune.model_dump().items() if k != "space"}
    space = {f"space.{k}.{field}": value for k, v in s.tune.space.items()
             for field, value in v.model_dump(exclude_none=True).items()}
    parent = create_parent_run(f"tune-{s.study_name}", experiment=s.params.tracking.experiment,
                               tracking_uri=tracking_uri(s.root), params={**knobs, **space}, repo_dir=s.root,
                               tags={"stage": "tune", "study": s.study_name, "target": s.tune.target,
                                     "storage": shareable_uri(s.storage_url)})
    try:
        yield parent
    except BaseException:
        finish_run(parent, failed=True)
        raise
    finish_run(parent)


def tune(params_path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (), *, n_workers: int = 1,
         apply: bool = False) -> dict:
    """Run the study with `n_workers` processes (this one and n-1 more), then record and report the best trial."""
    s = setup(params_path, overrides)
    preflight(s)
    with parent_run(s) as parent:
        helpers = [subprocess.Popen([sys.executable, "-m", "action3d.cli", *worker_argv(s, i, parent.run_id)],
                                    cwd=s.root, env={**os.environ, **worker_gpu_env(i)}) for i in range(1, n_workers)]
        try:
            work(s, parent.run_id)
        finally:
            failed = [p for p in helpers if p.wait() != 0]
        if failed:
            raise TuneError(f"{len(failed)} of the {n_workers - 1} extra worker(s) failed (exit codes "
                            f"{[p.returncode for p in failed]}); their output is above")
        return summarise(s, parent, apply=apply)


def worker_argv(s: Setup, index: int, parent_run_id: str | None) -> list[str]:
    """The `action3d` arguments of tuning worker `index` on this study (its trials nest under `parent_run_id`)."""
    return ["tune", "--params", str(s.params_path), "--worker", str(index),
            *(["--parent-run", parent_run_id] if parent_run_id else []), *[a for o in s.overrides for a in ("-S", o)]]


def worker_gpu_env(index: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for tuning worker `index`: one GPU each, round robin ({} on CPU)."""
    gpus = visible_gpus()
    return {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus else {}


def dashboard(s: Setup, *, port: int) -> int:
    """optuna-dashboard on this study's storage (the one tune.storage and tune.study, overrides included, name)."""
    url = s.storage_url
    if "://" not in url and not Path(url).is_file():
        raise TuneError(f"no study {s.study_name!r} yet: its journal {url} does not exist. Run `action3d tune` with "
                        "the same overrides first")
    say(f"optuna-dashboard on {shareable_uri(url)} (study {s.study_name}): http://127.0.0.1:{port}")
    executable = Path(sys.executable).parent / "optuna-dashboard"
    return subprocess.run([str(executable), "--host", "127.0.0.1", "--port", str(port), url]).returncode


def summarise(s: Setup, parent, *, apply: bool) -> dict:
    """Best trial -> params override file + the exact `dvc exp run` line (+ params.yaml with --apply); the
    study's plots and counts on the parent run."""
    study = open_study(s)
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    parent.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    if not counts["complete"]:
        raise TuneError(f"study {s.study_name!r}: no trial completed ({counts}); see the trials' errors above")
    best = study.best_trial
    # the study's own conditions (the command line's -S, tuning knobs aside) and the best trial's knobs
    overrides = [o for o in s.overrides if not o.startswith(("tune.", "study."))] + (
        best.user_attrs.get("overrides") or [f"{k}={_yaml_value(v)}" for k, v in best.params.items()])
    s.out_dir.mkdir(parents=True, exist_ok=True)
    command = "dvc exp run " + " ".join(f"-S {shlex.quote(o)}" for o in overrides)
    best_file = s.out_dir / "best.yaml"
    write_atomic_text(best_file, yaml.safe_dump({"study": s.study_name, "trial": best.number,
                                                 s.tune.metric: best.value, "overrides": overrides,
                                                 "dvc_exp_run": command}, sort_keys=False))
    parent.log_metrics({f"best_{s.tune.metric}": best.value, "best_trial": best.number})
    parent.log_params({f"best.{k}": v for k, v in best.params.items()})
    parent.set_tags({"best_dvc_exp_run": command})
    parent.log_artifact(best_file)
    for path in _plots(study, s.out_dir):
        parent.log_artifact(path, "plots")
    say(f"[tune] best trial {best.number}: {s.tune.metric} = {best.value:.4g} with {' '.join(overrides)}")
    say(f"[tune] reproduce it: {command}")
    result = {"study": s.study_name, "best_trial": best.number, "best_value": best.value, "overrides": overrides,
              "dvc_exp_run": command, "trials": counts, "best_file": str(best_file)}
    if apply:
        result["applied"] = apply_best(s, overrides)
    return result


def apply_best(s: Setup, overrides: list[str]) -> str:
    """Show the diff `overrides` make to params.yaml, then write them (comments kept); returns the diff."""
    from action3d.workspace import Workspace

    before, after = s.params_path.read_text(), Workspace(s.root).render_params(overrides)
    diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), "params.yaml (before)",
                                        "params.yaml (best trial)"))
    print(diff or "params.yaml already holds the best trial's knobs")
    write_atomic_text(s.params_path, after)
    return diff


def _plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances as PNG (importances need two finished trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    for name, draw in (("history", optuna_plots.plot_optimization_history),
                       ("importances", optuna_plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():  # "experimental" since Optuna 2.2: noise for our users
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials to say
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
