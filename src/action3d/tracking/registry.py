"""The model registry: registration with a promotion gate (champion / challenger), and browsing it.

Who is champion is a function of the registry's contents, not of the order registrations ran in: the champion is
the best version scored on the current test split (best `metric_key`, ties to the older version). A version's
score on split D is its own test metric when it was measured on D (tags `data_digest`, `metric.<key>`), else a
re-score on D (tag `rescore.<D>.<key>`, written when it was champion and the split changed). MLflow has no
transactions, so a registration creates its version, then points `champion` at the winner and re-reads until a
read agrees: the last alias write is followed by a read of its writer that saw every version created before it,
and every later version's writer reads after creating it, so concurrent registrations end on the same champion.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from action3d.errors import Action3dError
from action3d.project import shareable_uri, tracking_uri as default_tracking_uri
from action3d.tracking.models import NAME, download_checkpoint, load_module
from action3d.tracking.store import NOT_FOUND, client as make_client, quick_requests, store_exists

CHAMPION = "champion"
CHALLENGER = "challenger"
_SETTLE_ROUNDS = 20

Rescore = Callable[[Path], Mapping[str, Any]]  # a checkpoint file -> its test metrics on the current split


@dataclass(frozen=True)
class Registration:
    """What `register_model` did: the version of `name` for the run, its alias, and why."""

    name: str
    version: str
    alias: str | None  # "champion", "challenger", or None (an older version that lost its alias since)
    created: bool  # False when the run was already registered (nothing changed)
    reason: str
    # the version this one was compared with on the current split: {"version", "score", "rescored"}; None when alone
    compared: dict[str, Any] | None = None



def _find_logged_model(client: MlflowClient, run_id: str) -> str:
    run = client.get_run(run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{NAME}'")
    if not models:
        raise LookupError(f"run {run_id} logged no model named '{NAME}': register a run of a training stage")
    return max(models, key=lambda m: m.creation_timestamp).model_id  # the latest if it was logged twice

def _aliases_of(client: MlflowClient, name: str, version: str) -> list[str]:
    return list(client.get_model_version(name, version).aliases)


def _alias_of(client: MlflowClient, name: str, version: str) -> str | None:
    aliases = _aliases_of(client, name, version)
    return CHAMPION if CHAMPION in aliases else CHALLENGER if CHALLENGER in aliases else None


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in NOT_FOUND:
            return None
        raise


def _versions(client: MlflowClient, name: str) -> list:
    """Every version of `name` (all pages), oldest first."""
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def _rescore_tag(digest: str, key: str) -> str:
    return f"rescore.{digest}.{key}"


def _score_on(version, digest: str, key: str) -> tuple[float, bool] | None:
    """(score, re-scored?) of `version` for `key` on test split `digest`; None when unknown or NaN there."""
    raw, rescored = None, False
    if version.tags.get("data_digest") == digest:
        raw = version.tags.get(f"metric.{key}")
    if raw is None:
        raw, rescored = version.tags.get(_rescore_tag(digest, key)), True
    if raw is None or math.isnan(float(raw)):
        return None
    return float(raw), rescored


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def _ranked(versions: list, digest: str, key: str, higher_is_better: bool, skip: str | None = None):
    """The best of `versions` scored on `digest` as (version, score, rescored), ties to the older; None if none.
    A second version of a run already registered (two registrations of one run at once) does not count."""
    best, runs = None, set()
    for version in versions:  # oldest first: a later version must be strictly better to take over
        if version.run_id and version.run_id in runs:
            continue
        runs.add(version.run_id)
        scored = _score_on(version, digest, key)
        if scored is None or str(version.version) == skip:
            continue
        if best is None or _better(scored[0], best[1], higher_is_better):
            best = (version, *scored)
    return best


def _retried(write: Callable[[], Any], attempts: int = 5) -> None:
    """A registry write that may be repeated. The sqlite store sets an alias or a tag by reading, then inserting:
    two writers at once break a UNIQUE constraint and one gets an MlflowException, which a retry does not."""
    for attempt in range(attempts):
        try:
            write()
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _settle_champion(client: MlflowClient, name: str, digest: str, key: str, higher_is_better: bool):
    """Point `champion` at the best version scored on `digest`, and re-read until a read agrees (see above).
    Returns (the versions read last, the winner as _ranked gives it or None)."""
    for _ in range(_SETTLE_ROUNDS):
        versions = _versions(client, name)
        best = _ranked(versions, digest, key, higher_is_better)
        if best is None:
            return versions, None
        current = _champion(client, name)
        if current is not None and str(current.version) == str(best[0].version):
            return versions, best
        _retried(lambda: client.set_registered_model_alias(name, CHAMPION, best[0].version))
    raise RuntimeError(f"the {CHAMPION} alias of {name} kept moving over {_SETTLE_ROUNDS} rounds: is something "
                       f"else setting it?")


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in NOT_FOUND:
            return None
        raise


def _settle_challenger(client: MlflowClient, name: str, digest: str, key: str, higher_is_better: bool, mine: str):
    """Point `challenger` at the best version scored on `digest` that is not the best of all (the champion), and
    re-read until a read agrees, as `_settle_champion` does. Returns that runner-up as _ranked gives it, or None
    when no other version is scored there (a NaN score): then `mine` takes `challenger` when it holds none scored
    on `digest` (one write: two such versions at once need no agreement on which of them it is)."""
    for _ in range(_SETTLE_ROUNDS):
        versions = _versions(client, name)
        best = _ranked(versions, digest, key, higher_is_better)
        runner = _ranked(versions, digest, key, higher_is_better, skip=None if best is None else str(best[0].version))
        current = _alias_version(client, name, CHALLENGER)
        if runner is None:
            held = next((v for v in versions if str(v.version) == current), None)
            if held is None or _score_on(held, digest, key) is None:
                _retried(lambda: client.set_registered_model_alias(name, CHALLENGER, mine))
            return None
        if current == str(runner[0].version):
            return runner
        _retried(lambda: client.set_registered_model_alias(name, CHALLENGER, runner[0].version))
    raise RuntimeError(f"the {CHALLENGER} alias of {name} kept moving over {_SETTLE_ROUNDS} rounds: is something "
                       f"else setting it?")


def _rescore(client: MlflowClient, name: str, version, digest: str, key: str, rescore: Rescore) -> None:
    """Score `version`'s checkpoint on the current split with `rescore`; tag the version with the result."""
    with tempfile.TemporaryDirectory(prefix="action3d-rescore-") as tmp:
        try:
            path = download_checkpoint(f"models:/{name}/{version.version}", tmp)
        except (MlflowException, OSError) as err:
            raise LookupError(
                f"{CHAMPION} v{version.version} of {name} was not measured on test split {digest} and its checkpoint "
                f"cannot be fetched to re-score it ({str(err).splitlines()[0]}); move the alias by hand "
                "(`action3d registry promote`) or register it again from a training run") from err
        metrics = rescore(path)
    if key not in metrics:
        raise KeyError(f"re-scoring {name} v{version.version} gave no '{key}' (got {sorted(metrics)})")
    for metric, value in metrics.items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            tag = (_rescore_tag(digest, metric), str(float(value)))
            _retried(lambda: client.set_model_version_tag(name, version.version, *tag))


def register_model(
    run_id: str,
    name: str,
    *,
    metrics: Mapping[str, float],
    data_digest: str,
    metric_key: str,
    tracking_uri: str,
    higher_is_better: bool = True,
    rescore: Rescore | None = None,
) -> Registration:
    """Make the model logged by `run_id` a new version of registered model `name`, and give it an alias.

    The version is tagged `metric.<key>` for each of `metrics` (the test metrics), `data_digest` (the test
    split's DVC md5) and `metric_key`. `champion` then goes to the best version scored on this split (strictly
    better `metric_key` per `higher_is_better`, ties keep the older version). When the new version is not that,
    `challenger` goes to the best of the other versions scored on this split: the new version when it beats the
    current challenger there (or that one was measured on other data), else the challenger stays and the new
    version holds no alias (Registration.alias None). Its tags `promotion` (why), `compared.version`, `compared.<metric_key>` and
    `compared.rescored` record what it was compared with.

    When the champion was measured on another test split (or lacks `metric_key`), `rescore` scores its
    checkpoint on this split first, and the champion version is tagged `rescore.<digest>.<metric>`
    with the result. Without `rescore` such a champion is not comparable and the versions scored on this split
    take over (the reason says so).

    Registering a run that already has a version of `name` creates nothing and changes no alias (idempotent).
    Concurrent registrations (processes, machines) converge on one champion, the best (see the section's notes).
    """
    if "'" in name or "'" in run_id:
        raise ValueError(f"registered model name and run id may not contain quotes: {name!r}, {run_id!r}")
    if metric_key not in metrics:
        raise KeyError(f"metric_key '{metric_key}' is not among the metrics {sorted(metrics)}")
    # The sqlite registry resolves a version's `models:/<id>` source through the *global* tracking URI, which
    # defaults to ./mlflow.db: in another working directory (a `dvc exp` queue copy) it would look in the wrong store.
    mlflow.set_tracking_uri(tracking_uri)
    client = make_client(tracking_uri)

    def already(version) -> Registration:
        reason = f"run {run_id} is already version {version.version}"
        return Registration(name, str(version.version), _alias_of(client, name, version.version), False, reason)

    existing = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if existing:
        return already(min(existing, key=lambda v: int(v.version)))

    model_id = _find_logged_model(client, run_id)
    with contextlib.suppress(MlflowException):  # exists already: fine
        client.create_registered_model(name)
    previous = _champion(client, name)
    if previous is not None and rescore is not None and _score_on(previous, data_digest, metric_key) is None:
        _rescore(client, name, previous, data_digest, metric_key, rescore)

    tags = {f"metric.{k}": str(float(v)) for k, v in metrics.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
    tags.update(data_digest=data_digest, metric_key=metric_key)
    created = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
    )
    mine = str(created.version)
    twins = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    first = min(twins, key=lambda v: int(v.version))
    if str(first.version) != mine:  # the same run registered at the same time elsewhere: the older version stands
        client.delete_model_version(name, mine)
        return already(first)

    versions, best = _settle_champion(client, name, data_digest, metric_key, higher_is_better)
    if best is None and _champion(client, name) is None:  # a NaN score, and nothing else to crown
        _retried(lambda: client.set_registered_model_alias(name, CHAMPION, mine))
    won = str(best[0].version) == mine if best is not None else _champion_version(client, name) == mine
    alias, runner = CHAMPION, None
    if not won:  # challenger: the best version on this split that is not the champion (mine or an earlier one)
        runner = _settle_challenger(client, name, data_digest, metric_key, higher_is_better, mine)
        alias = CHALLENGER if runner is None or str(runner[0].version) == mine else None

    score = float(metrics[metric_key])
    other = _ranked(versions, data_digest, metric_key, higher_is_better, skip=mine) if won else best
    compared = None if other is None else {"version": str(other[0].version), "score": other[1], "rescored": other[2]}
    reason = _reason(metric_key, score, data_digest, won, other, previous)
    if alias is None:
        reason += (f", nor challenger v{runner[0].version}'s {runner[1]:.6g}: it keeps no alias "
                   f"(models:/{name}/{mine} still loads it)")
    version_tags = {"promotion": reason}
    if compared is not None:
        version_tags.update({"compared.version": compared["version"], f"compared.{metric_key}": str(compared["score"]),
                             "compared.rescored": str(compared["rescored"]).lower()})
    for key, value in version_tags.items():
        _retried(lambda: client.set_model_version_tag(name, mine, key, value))
    return Registration(name, mine, alias, True, reason, compared)


def _champion_version(client: MlflowClient, name: str) -> str | None:
    champion = _champion(client, name)
    return None if champion is None else str(champion.version)


def _reason(key: str, score: float, digest: str, won: bool, other, previous) -> str:
    """Why the new version got its alias, in words (the `promotion` tag)."""
    if other is None:
        if not won:
            return f"{key} {score:.6g} is not a number: it beats nothing"
        if previous is None:
            return "first version with an alias: champion"
        return (f"champion v{previous.version} was measured on test split {previous.tags.get('data_digest')}, "
                f"this version on {digest}, and it was not re-scored: not comparable, the version measured on the "
                f"current split takes over")
    version, best, rescored = other
    how = (f" (v{version.version} re-scored on this split; it measured {version.tags.get(f'metric.{key}', '?')} on "
           f"test split {version.tags.get('data_digest')})") if rescored else ""
    if won:
        return f"{key} {score:.6g} beats v{version.version}'s {best:.6g} on test split {digest}{how}"
    return f"{key} {score:.6g} does not beat champion v{version.version}'s {best:.6g} on test split {digest}{how}"


@dataclass(frozen=True)
class AliasedVersion:
    """A version of a registered model as the registry holds it now (`read_aliases`)."""

    version: str
    run_id: str | None
    metric_key: str | None
    score: float | None  # its test `metric_key` (the tag `metric.<key>`), None when it has none
    data_digest: str | None  # the test data it was measured on


def read_aliases(name: str, *, tracking_uri: str, timeout_s: float = 10) -> dict[str, AliasedVersion]:
    """The versions that `champion` and `challenger` of `name` point at now, by alias ({} when `name` is not
    registered or has no alias). Reads only: a sqlite store that does not exist raises FileNotFoundError instead of
    being created; a server that does not answer within about `timeout_s` raises (MlflowException or OSError)."""
    if not store_exists(tracking_uri):
        raise FileNotFoundError(f"no tracking database at {shareable_uri(tracking_uri)}")
    with quick_requests(timeout_s):
        client = make_client(tracking_uri)
        try:
            model = client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code in NOT_FOUND:
                return {}
            raise
        found = {}
        for alias in (CHAMPION, CHALLENGER):
            version = (model.aliases or {}).get(alias)
            if version is None:
                continue
            held = client.get_model_version(name, str(version))
            key = held.tags.get("metric_key")
            raw = held.tags.get(f"metric.{key}") if key else None
            found[alias] = AliasedVersion(str(version), held.run_id, key, None if raw is None else float(raw),
                                          held.tags.get("data_digest"))
        return found


def load_registered_model(name: str, *, alias: str = CHAMPION, tracking_uri: str):
    """The torch module of `models:/<name>@<alias>`, in eval mode, on the CPU (`models.load_module`)."""
    mlflow.set_tracking_uri(tracking_uri)
    return load_module(f"models:/{name}@{alias}")


# --- using the registry: resolve, browse, steer -------------------------------------------------------------------

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryError(Action3dError):
    """A registered model, version or alias that does not exist: the message lists what does."""


def resolve_version(uri: str, *, tracking_uri: str):
    """The ModelVersion of `models:/<name>@<alias>` or `models:/<name>/<version>`; a RegistryError listing the
    versions and aliases that exist when it is not there."""
    found = _MODEL_URI.match(uri)
    if not found:
        raise RegistryError(f"{uri!r} is not a registered model URI: write models:/<name>@<alias> (e.g. "
                            "models:/action3d-demo@champion) or models:/<name>/<version>")
    client = make_client(tracking_uri)
    name, alias, version = found["name"], found["alias"], found["version"]
    versions = _versions_or_error(client, name, tracking_uri)
    numbers = ", ".join(str(v.version) for v in versions)
    if alias:
        aliases = _alias_map(client, name)  # searches of versions do not fill in their aliases
        if alias not in aliases:
            shown = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"{name} has no alias {alias!r}; its aliases: {shown} (versions {numbers})")
        version = aliases[alias]
    match = [v for v in versions if str(v.version) == str(version)]
    if not match:
        raise RegistryError(f"{name} has no version {version}; its versions: {numbers}")
    return client.get_model_version(name, str(match[0].version))


def _alias_map(client: MlflowClient, name: str) -> dict[str, str]:
    """alias -> version number (as text) of registered model `name`."""
    return {alias: str(number) for alias, number in (client.get_registered_model(name).aliases or {}).items()}


def _versions_or_error(client: MlflowClient, name: str, tracking_uri: str) -> list:
    versions = _versions(client, name)
    if not versions:
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"no registered model {name!r} in {shareable_uri(tracking_uri)}; registered: "
                            f"{', '.join(names) or 'none (run the pipeline: `dvc repro`)'}")
    return versions


def download_version_checkpoint(uri: str, *, tracking_uri: str, dst: str | Path) -> Path:
    """The checkpoint file (weights and model card) of a registered version, downloaded into `dst`."""
    version = resolve_version(uri, tracking_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return download_checkpoint(f"models:/{version.name}/{version.version}", dst)
    except (MlflowException, OSError) as err:
        raise RegistryError(f"{uri} (v{version.version}): cannot fetch its checkpoint ({str(err).splitlines()[0]}): "
                            "check the artifact store is reachable, or use another version "
                            "(`action3d registry list`)") from None


def load_classifier(spec: str, *, tracking_uri: str | None = None):
    """A `predict.Classifier` from `models:/<name>@<alias>`, `models:/<name>/<version>` or a checkpoint file."""
    from action3d import predict

    if not spec.startswith("models:/"):
        return predict.load(spec)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar
    with tempfile.TemporaryDirectory(prefix="action3d-model-") as folder:
        path = download_version_checkpoint(spec, tracking_uri=tracking_uri or default_tracking_uri(), dst=folder)
        return predict.Classifier.from_file(path, source=spec)


def registry_versions(name: str, *, tracking_uri: str) -> list[dict[str, Any]]:
    """Every version of `name`, newest first: aliases, test metric, test data digest, run, commit, created."""
    client = make_client(tracking_uri)
    versions = _versions_or_error(client, name, tracking_uri)
    aliases = _alias_map(client, name)
    rows = []
    for v in reversed(versions):
        metrics = {k[len("metric."):]: float(val) for k, val in v.tags.items() if k.startswith("metric.")}
        rows.append({"version": str(v.version), "aliases": sorted(a for a, n in aliases.items() if n == str(v.version)),
                     "metric_key": v.tags.get("metric_key"), **metrics,
                     "data_digest": v.tags.get("data_digest"), "run_id": v.run_id,
                     "git_commit": v.tags.get("git_commit") or _run_tag(client, v.run_id, "git_commit"),
                     "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.creation_timestamp / 1000)),
                     "promoted": v.tags.get("promotion_reason")})
    return rows


def _run_tag(client: MlflowClient, run_id: str | None, key: str) -> str | None:
    try:
        return client.get_run(run_id).data.tags.get(key) if run_id else None
    except MlflowException:
        return None


def promote(name: str, version: str, *, alias: str, reason: str, tracking_uri: str) -> dict[str, Any]:
    """Point `alias` at `version` by hand; the reason (and who it replaced) is kept as tags on the version."""
    if not reason.strip():
        raise RegistryError("say why: --reason \"...\" is kept on the version, for whoever looks later")
    target = resolve_version(f"models:/{name}/{version}", tracking_uri=tracking_uri)
    client = make_client(tracking_uri)
    previous = _alias_map(client, name).get(alias)
    client.set_registered_model_alias(name, alias, str(target.version))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, value in {"promotion_reason": reason, "promoted_alias": alias, "promoted_at": stamp,
                       "promoted_over": previous or ""}.items():
        client.set_model_version_tag(name, str(target.version), key, value)
    return {"name": name, "version": str(target.version), "alias": alias, "previous": previous, "reason": reason}


def lineage(uri: str, *, tracking_uri: str) -> dict[str, Any]:
    """version -> its training run -> the runs it came from (tag source_run_id: finetune -> pretrain) -> the data
    digests and git commit each recorded."""
    version = resolve_version(uri, tracking_uri=tracking_uri)
    client = make_client(tracking_uri)
    chain, run_id = [], version.run_id
    while run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            chain.append({"run_id": run_id, "missing": True})
            break
        tags = run.data.tags
        chain.append({"run_id": run_id, "stage": tags.get("stage"), "git_commit": tags.get("git_commit"),
                      "git_dirty": tags.get("git_dirty"), "params_hash": tags.get("params_hash"),
                      "data": {k[len("data_digest."):]: v for k, v in tags.items() if k.startswith("data_digest.")},
                      "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.info.start_time / 1000))})
        run_id = tags.get("source_run_id")
    return {"model": f"models:/{version.name}/{version.version}",
            "aliases": sorted(a for a, n in _alias_map(client, version.name).items() if n == str(version.version)),
            "test_data_digest": version.tags.get("data_digest"), "runs": chain}
