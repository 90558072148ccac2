"""`action3d report`: what the pipeline measured, what it registered, and where to look next."""

from __future__ import annotations

import ast
import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from action3d.atomic import write_atomic_text
from action3d.errors import Action3dError
from action3d.stages.common import shareable_uri, tracking_uri


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


FITS = 0.9  # a baseline that scores at least this on its own training videos was trained properly


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{_f(value)}%"


def report(runs: Path) -> str:
    finetuned = _read(runs / "evaluate" / "finetune" / "metrics.json")
    scratch = _read(runs / "evaluate" / "scratch" / "metrics.json")
    registration = _read(runs / "register" / "registration.json")
    if finetuned is None:
        return f"no results in {runs}/ yet: run `dvc repro` (or `make run`)"

    lines = [f"results in {runs}/ (test split, video level: clip softmax averaged over every 16-frame window)", ""]
    lines.append(f"  fine-tuned from pretraining   video top-1 {_pct(finetuned['video_top1'])}   "
                 f"top-5 {_pct(finetuned['video_top5'])}   clip top-1 {_pct(finetuned['clip_top1'])}   "
                 f"({finetuned['videos']} videos)")
    if "train_video_top1" in finetuned:
        lines.append(f"                                its training videos {_pct(finetuned['train_video_top1'])}")
    if "time_shuffled_video_top1" in finetuned:
        shuffled, chance = finetuned["time_shuffled_video_top1"], finetuned["chance"]
        verdict = "near chance: the model uses motion" if shuffled <= chance + 0.15 else "well above chance"
        lines.append(f"  same model, frames shuffled   video top-1 {_pct(shuffled)}   (chance {_pct(chance)}: {verdict})")
    if scratch is not None:
        gain = 100 * (finetuned["video_top1"] - scratch["video_top1"])
        lines.append(f"  from scratch (the baseline)   video top-1 {_pct(scratch['video_top1'])}   "
                     f"(pretraining is worth {gain:+.1f} points)")
        fit = scratch.get("train_video_top1")
        if fit is not None:
            verdict = ("it fits them: a fair baseline" if fit >= FITS else
                       "it does not fit them: tune the scratch knobs before trusting the gain")
            lines.append(f"                                its training videos {_pct(fit)} ({verdict})")
    uri = shareable_uri(tracking_uri())  # printed, so no password; a sqlite path relative to the project root
    if registration is not None:
        lines += ["", *_registry_lines(registration, uri)]
    ui = (f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}")
    lines += [
        "",
        "where to look:",
        "  dvc metrics show                  the metrics above, per stage",
        "  dvc plots show                    training curves and confusion matrices (dvc_plots/index.html)",
        f"  {runs}/evaluate/*/confusion.png".ljust(36) + "confusion matrices",
        f"  {ui}",
        "                                    every run, its params, curves and lineage; the model registry",
    ]
    return "\n".join(lines)


_PAD = " " * 20


def _registry_lines(registration: dict, shown_uri: str) -> list[str]:
    """What this workspace registered (runs/register/registration.json: the last `dvc repro` here) against what the
    registry's aliases point at now: queued experiments and other machines register into the same model."""
    name, mine = registration["name"], str(registration["version"])
    then = registration.get("alias") or "no alias"
    lines = [f"  registered model  {name}: this workspace's run made version {mine} "
             f"(at registration: {then}: {registration['reason']})"]
    try:
        from action3d.tracking import read_aliases

        aliases = read_aliases(name, tracking_uri=tracking_uri())
    except Exception as err:  # noqa: BLE001 - unreachable server, missing database: the report still stands
        lines.append(f"  registry now      cannot be read from {shown_uri} ({type(err).__name__}): the aliases "
                     f"may have moved since")
        aliases = None
    if aliases == {}:
        lines.append(f"  registry now      {name} has no champion or challenger in {shown_uri}")
    elif aliases:
        now = next((alias for alias, held in aliases.items() if held.version == mine), None)
        lines.append(f"  registry now      version {mine} holds {now or 'no alias'}")
        for alias, held in aliases.items():
            score = "no score" if held.score is None else f"{held.metric_key} {held.score:.4g}"
            lines.append(f"{_PAD}{alias} v{held.version}: {score} on test data {(held.data_digest or '?')[:12]}")
    lines.append(f"  load it with      mlflow.pyfunc.load_model('models:/{name}/{mine}')   (this workspace's version)")
    champion = aliases.get("champion") if aliases else None
    which = ("whichever version holds it" if champion is None else
             "this version, now" if champion.version == mine else f"now v{champion.version}, another model")
    lines.append(f"{_PAD}mlflow.pyfunc.load_model('models:/{name}@champion')   (the champion: {which})")
    return lines


# --- the written report: reports/index.html and reports/README.md, from MLflow ------------------------------------
#
# What is reported is picked from the tracking store, not from runs/: the latest pipeline of an experiment (one
# row per training stage: pretrain, fine-tuned, scratch), an architecture study (`--study`: its entries' runs,
# nested under `study-<name>`) or a tuning study (`--tune`: its trials, nested under `tune-<name>`). Each row is a
# training run with the evaluate run made of its model (tag parent_run_id), as the paper's tables: model, size, cost,
# clip and video accuracy per set, time.

TRAINING_STAGES = ("pretrain", "finetune", "scratch")
_LABELS = {"pretrain": "pretrained (large set)", "finetune": "fine-tuned from pretraining", "scratch": "from scratch"}


@dataclass
class ModelRow:
    label: str
    run_id: str
    stage: str
    arch: str
    params_m: float | None
    gflops: float | None
    train_top1: float | None  # clip accuracy of the last training epoch
    val_video_top1: float | None  # the best epoch's, on the validation split
    minutes: float | None
    test: dict[str, float] = field(default_factory=dict)  # the evaluate run's metrics (test split, video level)
    eval_run_id: str | None = None
    curves: str | None = None  # image paths relative to the report folder
    confusion: str | None = None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _quoted(value: str) -> str:
    """`value` as a quoted literal of an MLflow filter string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _all_runs(client, experiment_id: str, query: str):
    """Every run matching `query`, newest first, page by page (a study or a long history holds many)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=500, order_by=["attribute.start_time DESC"],
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _scope(client, experiment_id: str, study: str | None, tune: str | None) -> tuple[str, list]:
    """(title, training runs) of what the report covers."""
    if tune:  # every trial of the tuning study, whichever `action3d tune` call (parent run) ran it: its newest run
        trials: dict[str, Any] = {}
        for run in _all_runs(client, experiment_id, f"tags.study = {_quoted(tune)}"):
            number = run.data.tags.get("trial")
            if number is not None and run.data.tags.get("stage") in TRAINING_STAGES:
                trials.setdefault(number, run)
        if not trials:
            raise Action3dError(f"no trials of tuning study {tune!r} in this experiment's runs: run `action3d tune` "
                                "first, or check --experiment")
        return f"tuning study {tune}", [trials[k] for k in sorted(trials, key=int)]
    if study:
        parents = client.search_runs([experiment_id], f"tags.stage = 'study' AND tags.study = {_quoted(study)}",
                                     max_results=1, order_by=["attribute.start_time DESC"])
        if not parents:
            names = sorted({r.data.tags.get("study", "?") for r in _all_runs(client, experiment_id,
                                                                               "tags.stage = 'study'")})
            raise Action3dError(f"no architecture study {study!r} in this experiment's runs (studies: "
                                f"{', '.join(names) or 'none'}): run it first (`make study`), or check --experiment")
        children = _all_runs(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        return f"study {study}", [r for r in children if r.data.tags.get("stage") in TRAINING_STAGES]
    latest = []
    for stage in TRAINING_STAGES:  # the pipeline's own runs: not nested under a study or a tuning run
        runs = _all_runs(client, experiment_id, f"tags.stage = '{stage}' AND attributes.status = 'FINISHED'")
        latest.append(next((r for r in runs if "mlflow.parentRunId" not in r.data.tags), None))
    return "the latest pipeline", [r for r in latest if r is not None]


def _label(run) -> str:
    tags = run.data.tags
    if "trial" in tags:
        return f"trial {tags['trial']}"
    entry = tags.get("study_entry")
    stage = tags.get("stage", "?")
    return f"{entry}: {_LABELS.get(stage, stage)}" if entry else _LABELS.get(stage, stage)


def _classes(client, run_id: str) -> int | None:
    """The class count of a training run's model: its logged classes.json."""
    with tempfile.TemporaryDirectory(prefix="action3d-report-") as folder:
        try:
            return len(json.loads(Path(client.download_artifacts(run_id, "classes.json", folder)).read_text()))
        except Exception:  # noqa: BLE001 - an older run without it: the builder's default head
            return None


def _cost(run, n_classes: int | None) -> tuple[float | None, float | None]:
    """Parameters (millions) and forward GFLOPs per clip of a training run's model, from its logged params."""
    from action3d.models.summary import count_flops, count_params

    p = run.data.params
    arch, kwargs = p.get("model.name"), ({"n_classes": n_classes} if n_classes else {})
    for key, value in p.items():
        if key.startswith("model.kwargs."):
            with contextlib.suppress(ValueError, SyntaxError):
                kwargs[key[len("model.kwargs."):]] = ast.literal_eval(value)
    try:
        frames, crop = int(p["clip.frames"]), int(p["clip.crop_size"])
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return count_params(arch, **kwargs) / 1e6, count_flops(arch, (frames, crop, crop), **kwargs) / 1e9
    except (KeyError, ValueError, TypeError, RuntimeError):
        return None, None


def _history(client, run_id: str) -> list[dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for key in ("train_loss", "val_loss", "train_top1", "val_top1", "val_video_top1", "lr"):
        for point in client.get_metric_history(run_id, key):
            rows.setdefault(point.step, {"epoch": point.step})[key] = point.value
    return [rows[k] for k in sorted(rows)]


def collect(client, experiment_id: str, out: Path, *, study: str | None = None,
            tune: str | None = None) -> tuple[str, list[ModelRow]]:
    """The rows of the report, with their curves (drawn from the metric history) and confusion matrices
    (the evaluate run's PNG) written under `out`/img."""
    from action3d.plots import plot_history

    title, runs = _scope(client, experiment_id, study, tune)
    rows = []
    for i, run in enumerate(runs):
        m, info = run.data.metrics, run.info
        params_m, gflops = _cost(run, _classes(client, info.run_id))
        label = _label(run)
        row = ModelRow(label, info.run_id, run.data.tags.get("stage", "?"), run.data.params.get("model.name", "?"),
                       params_m, gflops, m.get("final_train_top1"), m.get("best_val_video_top1"),
                       (info.end_time - info.start_time) / 60000 if info.end_time else None)
        history = _history(client, info.run_id)
        if row.train_top1 is None:  # a run stopped early (a pruned trial): its last epoch, its best so far
            row.train_top1 = m.get("train_top1")
        if row.val_video_top1 is None:
            row.val_video_top1 = max((h["val_video_top1"] for h in history if "val_video_top1" in h), default=None)
        if history:
            row.curves = f"img/{i:02d}-{row.stage}-curves.png"
            plot_history(history, out / row.curves, title=label)
        evals = client.search_runs([experiment_id], f"tags.stage = 'evaluate' AND tags.parent_run_id = '{info.run_id}'",
                                   max_results=1, order_by=["attribute.start_time DESC"])
        if evals:
            row.eval_run_id, row.test = evals[0].info.run_id, dict(evals[0].data.metrics)
            with contextlib.suppress(Exception):  # a run without the PNG (an older version): the table stands
                folder = client.download_artifacts(row.eval_run_id, "confusion.png", str(out / "img"))
                row.confusion = f"img/{i:02d}-{row.stage}-confusion.png"
                Path(folder).replace(out / row.confusion)
        rows.append(row)
    return title, rows


def _transfer(rows: list[ModelRow]) -> dict[str, Any] | None:
    """Pretrained-then-fine-tuned against from-scratch on the same test set (the paper's transfer question)."""
    tuned = next((r for r in rows if r.stage == "finetune" and r.test), None)
    scratch = next((r for r in rows if r.stage == "scratch" and r.test), None)
    if tuned is None or scratch is None:
        return None
    fit = scratch.test.get("train_video_top1")
    return {"finetune": tuned.test.get("video_top1"), "scratch": scratch.test.get("video_top1"),
            "finetune_fit": tuned.test.get("train_video_top1"), "scratch_fit": fit,
            "gain": 100 * (tuned.test["video_top1"] - scratch.test["video_top1"]),
            "fair": fit is not None and fit >= FITS}


def champion(name: str, uri: str, root: Path) -> dict[str, Any] | None:
    """The champion version, its registry row and its lineage with the dvc.lock outputs its data digests match."""
    from action3d.tracking import RegistryError, lineage, registry_versions

    try:
        chain = lineage(f"models:/{name}@champion", tracking_uri=uri)
    except RegistryError:
        return None
    version = chain["model"].rsplit("/", 1)[1]
    row = next(r for r in registry_versions(name, tracking_uri=uri) if r["version"] == version)
    return {"name": name, **row, "lineage": locate_data(chain, root)}


def locate_data(chain: dict[str, Any], root: Path) -> dict[str, Any]:
    """`chain` (tracking.lineage) with, per run, where its data digests are outputs of the project's dvc.lock
    (`in_dvc_lock`: context -> paths): `git checkout <commit> && dvc checkout` brings back that data."""
    from action3d.workspace import Workspace, WorkspaceError

    try:
        ws = Workspace(root)
    except WorkspaceError:
        return chain
    found = ws.locate({d for run in chain["runs"] for d in run.get("data", {}).values()})
    for run in chain["runs"]:
        run["in_dvc_lock"] = {ctx: found[d] for ctx, d in run.get("data", {}).items() if d in found}
    return chain


def _f(value: float | None, pct: bool = True, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.{digits}f}" if pct else f"{value:.{digits}f}"


def _table(rows: list[ModelRow]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "arch", "params (M)", "GFLOPs/clip", "train top-1 (clips)", "val video top-1",
            "test clip top-1", "test video top-1", "test video top-5", "test videos", "minutes"]
    body = [[r.label, r.arch, _f(r.params_m, False, 2), _f(r.gflops, False, 2), _f(r.train_top1),
             _f(r.val_video_top1), _f(r.test.get("clip_top1")), _f(r.test.get("video_top1")),
             _f(r.test.get("video_top5")), str(int(r.test["videos"])) if "videos" in r.test else "-",
             _f(r.minutes, False)] for r in rows]
    return head, body


def write_report(out: Path, *, tracking_uri: str, experiment: str, model_name: str, root: Path,
                 study: str | None = None, tune: str | None = None) -> Path:
    """reports/index.html and reports/README.md (same content) with images in reports/img/. Returns index.html."""
    import html

    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except MlflowException as err:
        raise Action3dError(f"cannot read the tracking store {shareable_uri(tracking_uri)} ({str(err).splitlines()[0]})"
                            ": start the server or set MLFLOW_TRACKING_URI to a store that answers") from None
    if found is None:
        raise Action3dError(f"no MLflow experiment {experiment!r} in {shareable_uri(tracking_uri)}: run the pipeline "
                            "first (`make run`), or name one with --experiment")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "img", ignore_errors=True)  # images of an earlier report must not linger
    title, rows = collect(client, found.experiment_id, out, study=study, tune=tune)
    transfer = _transfer(rows)
    best = champion(model_name, tracking_uri, root) if not (study or tune) else None
    head, body = _table(rows)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    heading = f"action3d report: {title}"
    where = f"experiment `{experiment}` in `{shareable_uri(tracking_uri)}`, {stamp}"

    md = [f"# {heading}", "", where, "", "Accuracies in %. Test: video level (clip softmax averaged over every "
          "window), as in Hara et al.'s tables.", "", "| " + " | ".join(head) + " |",
          "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in body], ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title><style>"
         "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}th{background:#eef3f8}img{max-width:100%;margin:.5em 0}"
         ".note{color:#555}table.lineage td{text-align:left}</style></head><body>",
         f"<h1>{html.escape(heading)}</h1><p class='note'>{html.escape(where)}</p>",
         "<p class='note'>Accuracies in %. Test: video level (clip softmax averaged over every window), as in "
         "Hara et al.'s tables.</p>", "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>",
         *["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body], "</table>"]
    if not rows:
        md.append("No training runs found: run the pipeline (`make run`).")
        h.append("<p>No training runs found: run the pipeline (<code>make run</code>).</p>")
    if transfer:
        verdict = ("the baseline fits its training videos: a fair comparison" if transfer["fair"] else
                   "the baseline does NOT fit its training videos: tune it before trusting the gain")
        line = (f"Pretrained then fine-tuned: {_f(transfer['finetune'])}% test video top-1 (its training videos "
                f"{_f(transfer['finetune_fit'])}%); from scratch: {_f(transfer['scratch'])}% (its training videos "
                f"{_f(transfer['scratch_fit'])}%). Pretraining is worth {transfer['gain']:+.1f} points; {verdict}.")
        md += ["## Transfer: pretrained vs scratch", "", line, ""]
        h += ["<h2>Transfer: pretrained vs scratch</h2>", f"<p>{html.escape(line)}</p>"]
    if best:
        runs = best["lineage"]["runs"]
        key = best.get("metric_key")
        score = f"{key} {best[key]:.4f}" if key in best else "no test metric"
        line = (f"{best['name']} v{best['version']} ({', '.join(best['aliases'])}): {score} on test data "
                f"{(best['data_digest'] or '?')[:12]}; git commit {(best['git_commit'] or '?')[:10]}")
        md += ["## Champion", "", line, "", "| run | stage | git commit | data | in dvc.lock |", "|---|---|---|---|---|"]
        h += ["<h2>Champion</h2>", f"<p>{html.escape(line)}</p>",
              "<table class='lineage'><tr><th>run</th><th>stage</th><th>git commit</th><th>data</th><th>in dvc.lock</th></tr>"]
        for run in runs:
            data = ", ".join(f"{k} {v[:12]}" for k, v in run.get("data", {}).items())
            lock = "; ".join(p for paths in run.get("in_dvc_lock", {}).values() for p in paths) or "-"
            cells = [run["run_id"][:12], str(run.get("stage")), (run.get("git_commit") or "?")[:10], data, lock]
            md.append("| " + " | ".join(cells) + " |")
            h.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        h.append("</table>")
        md.append("")
    images = [(r.label, kind, path) for r in rows for kind, path in (("training curves", r.curves),
                                                                      ("test confusion matrix", r.confusion)) if path]
    if images:
        md += ["## Curves and confusion matrices", ""]
        h.append("<h2>Curves and confusion matrices</h2>")
        for label, kind, path in images:
            md += [f"**{label}**, {kind}", "", f"![{label} {kind}]({path})", ""]
            h.append(f"<h3>{html.escape(label)}: {kind}</h3><img src='{html.escape(path)}' alt='{html.escape(kind)}'>")
    # the page counts the images it could show (body data-images="loaded/all"): a browser check reads it
    h.append("<script>addEventListener('load', () => { const all = [...document.images]; document.body.dataset"
             ".images = all.filter(i => i.complete && i.naturalWidth > 0).length + '/' + all.length; });</script>")
    h.append("</body></html>")
    write_atomic_text(out / "README.md", "\n".join(md) + "\n")
    return write_atomic_text(out / "index.html", "\n".join(h) + "\n")
