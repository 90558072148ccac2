"""`action3d report`: what the pipeline measured, what it registered, and where to look next.

Two views of one set of findings:
- the terminal summary (what `make run` ends with), from the pipeline's outputs in runs/: the paper's findings in
  miniature, each number with its 95% interval over the test videos: (a) the fine-tuned model's accuracy, (b) the
  same model on frames shuffled in time (the motion control), (c) what pretraining is worth against a baseline
  trained from scratch (paired over the same videos), (d) whether training from scratch overfits the small set
  and the large one; then the registry and each stage's minutes;
- reports/index.html and reports/README.md, from MLflow (tracking.browse): the latest pipeline, an architecture
  study (`--study`) or a tuning study (`--tune`) as the paper's tables (model, size, cost, accuracies, time), with
  curves, confusion matrices and the champion's lineage down to dvc.lock's outputs.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import html
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from action3d.atomic import write_atomic_text
from action3d.project import shareable_uri, tracking_uri

FITS = 0.95  # a baseline that scores at least this on its own training videos was trained properly
NEAR_CHANCE = 0.15  # within this of chance, a time-shuffled score says the model reads motion
TRAINING_STAGES = ("scratch@pretrain", "finetune", "scratch@finetune")  # as the MLflow runs are named
LABELS = {"scratch@pretrain": "from scratch on the large set (pretraining)", "finetune": "fine-tuned from pretraining",
          "scratch@finetune": "from scratch on the small set (the baseline)"}
HISTORY_KEYS = ("train_loss", "val_loss", "train_top1", "val_top1", "val_video_top1", "lr")


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _interval(low: float | None, high: float | None, points: bool = False) -> str:
    if low is None or high is None:
        return ""
    if points:
        return f" [95% interval {100 * low:+.1f} to {100 * high:+.1f}]"
    return f" [95% interval {100 * low:.1f}-{100 * high:.1f}%]"


# --- the findings -------------------------------------------------------------------------------------------------


def fit_verdict(fit: float | None, epochs: tuple[int | None, int | None] = (None, None)) -> str:
    """Whether a baseline is fair: it fits its own training videos (a gain over one that does not means little)
    and it trained as many epochs as fine-tuning (`epochs`: fine-tuning's, the baseline's; None = unknown)."""
    if fit is None:
        return "its fit to its training videos is unknown"
    if fit < FITS:
        return f"it does NOT fit them ({_pct(fit)} < {_pct(FITS)}): tune the baseline before trusting the gain"
    tuned, base = epochs
    if tuned is not None and base is not None and tuned != base:
        return (f"it fits them ({_pct(fit)}), but trained {base} epochs against fine-tuning's {tuned}: NOT the same "
                "budget; give scratch.finetune.epochs and finetune.epochs the same number")
    return f"it fits them ({_pct(fit)} >= {_pct(FITS)}): a fair baseline"


def epochs_trained(run_folder: Path) -> int | None:
    """The epochs a training stage ran (its run.json), None when it has not run."""
    run = _read(run_folder / "run.json")
    return None if run is None else run.get("epochs")


def motion_verdict(accuracy: float, shuffled: float, chance: float) -> str:
    """What the time-shuffled control says: only a model well above chance can show that it reads motion."""
    if accuracy <= chance + NEAR_CHANCE:
        return "the model itself is near chance, so the control says nothing"
    if shuffled <= chance + NEAR_CHANCE:
        return "near chance: the model reads motion, not single frames"
    return "well above chance: the model reads single frames too"


def last_losses(history_csv: Path) -> tuple[float, float] | None:
    """(train loss, validation loss) of a training stage's last epoch, from its history.csv."""
    if not history_csv.is_file():
        return None
    with open(history_csv, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train_loss") and row.get("val_loss")]
    return (float(rows[-1]["train_loss"]), float(rows[-1]["val_loss"])) if rows else None


def test_loss(evaluate_dir: Path) -> float | None:
    """The clip loss on the test videos, from the evaluate stage's metrics.json."""
    path = evaluate_dir / "metrics.json"
    loss = json.loads(path.read_text()).get("loss") if path.is_file() else None
    return float(loss) if loss is not None else None


def overfitting_lines(runs: Path) -> list[str]:
    """The paper's first question, in one number per set: held-out loss over training loss at the last epoch of
    training from scratch, on the large set and on the small one, and which of the two overfits.

    Held out, as the paper holds it out: the large set's validation videos, and for the small set its test videos
    (the paper's validation on UCF-101 is split 1's test list). The small set's own validation split is a few groups
    (the demo's: 2 scenes, 14 videos), which a from-scratch model can score well on while failing the other scenes;
    its validation loss is the fallback when the model was not evaluated."""
    large = last_losses(runs / "scratch" / "pretrain" / "history.csv")
    small = last_losses(runs / "scratch" / "finetune" / "history.csv")
    tested = test_loss(runs / "evaluate" / "scratch")
    rows = [("large set (pretraining)", large, "validation")]
    if small:
        rows.append(("small set (the baseline)", (small[0], tested) if tested is not None else small,
                     "test" if tested is not None else "validation"))
    lines = []
    for name, losses, held in rows:
        if losses:
            lines.append(f"  from scratch, {name:<26} last epoch: train loss {losses[0]:.3f}, {held} loss "
                         f"{losses[1]:.3f}: {held} / train {losses[1] / losses[0]:.1f}")
    if large and small:
        r_large, r_small = large[1] / large[0], rows[1][1][1] / rows[1][1][0]
        lines.append("  => trained from scratch, the network overfits the small set " + (
            f"({r_small:.1f}) far more than the large one ({r_large:.1f})" if r_small > 2 * r_large else
            f"({r_small:.1f}) no more than twice as much as the large one ({r_large:.1f}): not the paper's finding"))
    return lines


def gain_verdict(low: float, high: float, p: float) -> str:
    """Whether the paired difference is shown: both tests must say so, the bootstrap interval over the same test
    videos (it excludes 0) and McNemar's exact test on the videos the two models disagree on (p < 0.05)."""
    if low <= 0 <= high:
        return "the difference is NOT shown: its interval holds 0"
    if p >= 0.05:
        return "the difference is NOT clearly shown: its interval excludes 0, but McNemar p >= 0.05"
    return "the difference is shown (its interval excludes 0, McNemar p < 0.05)"


def findings(runs: Path) -> list[str]:
    """(a) to (d) as lines; [] when the pipeline has not run yet."""
    summary, tuned = _read(runs / "metrics.json"), _read(runs / "evaluate" / "finetune" / "metrics.json")
    base = _read(runs / "evaluate" / "scratch" / "metrics.json")
    if summary is None or tuned is None:
        return []
    ft, sc, chance = summary["finetune"], summary["scratch"], summary["chance"]
    lines = [f"on {summary['test_videos']} test videos (video level: clip softmax averaged over every window; "
             f"chance {_pct(chance)}):",
             f"  (a) fine-tuned from pretraining   video top-1 {_pct(ft['video_top1'])}"
             f"{_interval(ft.get('video_top1_low'), ft.get('video_top1_high'))}, its training videos "
             f"{_pct(ft.get('train_video_top1'))}"]
    if "time_shuffled_video_top1" in ft:
        shuffled = ft["time_shuffled_video_top1"]
        lines.append(f"  (b) same model, frames shuffled  video top-1 {_pct(shuffled)}"
                     f"{_interval(ft.get('time_shuffled_video_top1_low'), ft.get('time_shuffled_video_top1_high'))}"
                     f": {motion_verdict(ft['video_top1'], shuffled, chance)}")
    gain, low, high = summary["transfer_gain"], summary["transfer_gain_low"], summary["transfer_gain_high"]
    epochs = epochs_trained(runs / "finetune"), epochs_trained(runs / "scratch" / "finetune")
    lines += [f"  (c) from scratch (the baseline)   video top-1 {_pct(sc['video_top1'])}"
              f"{_interval(sc.get('video_top1_low'), sc.get('video_top1_high'))}; "
              f"{fit_verdict((base or {}).get('train_video_top1'), epochs)}",
              f"      pretraining is worth {100 * gain:+.1f} points{_interval(low, high, points=True)}, McNemar "
              f"p = {summary['transfer_gain_p']:.2g}: {gain_verdict(low, high, summary['transfer_gain_p'])}"]
    rq1 = overfitting_lines(runs)
    if rq1:
        lines += ["  (d) overfitting, trained from scratch:", *rq1]
    return lines


def stage_minutes(runs: Path) -> list[str]:
    """Each stage's minutes, as its last run here took them (runs/timings/, written by `action3d stage`)."""
    from action3d.stages import ROLES, STAGES

    def order(timing: dict) -> tuple[int, int, str]:
        name, _, which = timing["stage"].partition("@")
        role = which.split("-")[0]  # cache@<role>-<slice>
        return (list(STAGES).index(name) if name in STAGES else len(STAGES), ROLES.index(role) if role in ROLES else 0,
                which)

    recorded = _locked_stages(runs.parent / "dvc.lock")  # a stage renamed or removed since leaves its file behind
    timings = sorted((t for t in map(_read, (runs / "timings").glob("*.json"))
                      if t and (recorded is None or t["stage"] in recorded)), key=order)
    if not timings:
        return []
    total = sum(t["seconds"] for t in timings)
    shown = ", ".join(f"{t['stage']} {t['seconds'] / 60:.1f}" for t in timings)
    return [f"stage minutes (their last run here): {shown}; {total / 60:.1f} in all"]


def _locked_stages(lock: Path) -> set[str] | None:
    """The stages dvc.lock records (None without one)."""
    if not lock.is_file():
        return None
    import yaml

    return set((yaml.safe_load(lock.read_text()) or {}).get("stages", {}))


def terminal_summary(runs: Path, params: Any = None) -> str:
    lines = findings(runs)
    if not lines:
        return f"no results in {runs}/ yet: run `dvc repro` (or `make run`)"
    uri = shareable_uri(tracking_uri())  # printed, so no password; a sqlite path relative to the project root
    registration = _read(runs / "register" / "registration.json")
    if registration is not None:
        lines += ["", *_registry_lines(registration, uri)]
    lines += ["", *stage_minutes(runs)]
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"
    lines += ["", "where to look:",
              "  dvc metrics show                  the numbers above with their intervals (runs/metrics.json)",
              "  dvc plots show                    training curves and confusion matrices (dvc_plots/index.html)",
              f"  {ui}",
              "                                    every run, its params, curves and lineage; the model registry"]
    return "\n".join(lines)


_PAD = " " * 20


def _registry_lines(registration: dict, shown_uri: str) -> list[str]:
    """What this workspace registered (runs/register/registration.json: the last `dvc repro` here) against what the
    registry's aliases point at now: queued experiments and other machines register into the same model."""
    name, mine = registration["name"], str(registration["version"])
    lines = [f"registered model  {name}: this workspace's run made version {mine} "
             f"(at registration: {registration.get('alias') or 'no alias'}: {registration['reason']})"]
    try:
        from action3d.tracking.registry import read_aliases

        aliases = read_aliases(name, tracking_uri=tracking_uri())
    except Exception as err:  # noqa: BLE001 - unreachable server, missing database: the report still stands
        lines.append(f"registry now      cannot be read from {shown_uri} ({type(err).__name__}): the aliases may have "
                     "moved since")
        aliases = None
    if aliases == {}:
        lines.append(f"registry now      {name} has no champion or challenger in {shown_uri}")
    elif aliases:
        now = next((alias for alias, held in aliases.items() if held.version == mine), None)
        lines.append(f"registry now      version {mine} holds {now or 'no alias'}")
        for alias, held in aliases.items():
            score = "no score" if held.score is None else f"{held.metric_key} {held.score:.4g}"
            lines.append(f"{_PAD}{alias} v{held.version}: {score} on test data {(held.data_digest or '?')[:12]}")
    lines.append(f"load it with      mlflow.pyfunc.load_model('models:/{name}/{mine}')   (this workspace's version)")
    champion = aliases.get("champion") if aliases else None
    which = ("whichever version holds it" if champion is None else
             "this version, now" if champion.version == mine else f"now v{champion.version}, another model")
    lines.append(f"{_PAD}mlflow.pyfunc.load_model('models:/{name}@champion')   (the champion: {which})")
    return lines


# --- the written report: reports/index.html and reports/README.md, from MLflow ------------------------------------


@dataclass
class ModelRow:
    label: str
    run_id: str
    stage: str
    arch: str
    params_m: float | None
    gflops: float | None
    train_top1: float | None  # clip accuracy of the last training epoch
    val_video_top1: float | None  # model.pt's (the kept epoch), on the validation split
    minutes: float | None
    test: dict[str, float] = field(default_factory=dict)  # the evaluate run's metrics (test split, video level)
    curves: str | None = None  # image paths relative to the report folder
    confusion: str | None = None


def _label(run) -> str:
    if "trial" in run.tags:
        return f"trial {run.tags['trial']}"
    entry = run.tags.get("study_entry")
    label = LABELS.get(run.stage, run.stage)
    return f"{entry}: {label}" if entry else label


def _cost(run) -> tuple[float | None, float | None]:
    """Parameters (millions) and forward GFLOPs per clip of a training run's model, from its logged params."""
    from action3d.models.summary import count_flops, count_params

    p = run.params
    kwargs: dict[str, Any] = {"n_classes": int(run.tags["n_classes"])} if run.tags.get("n_classes") else {}
    for key, value in p.items():
        if key.startswith("model.kwargs."):
            with contextlib.suppress(ValueError, SyntaxError):
                kwargs[key[len("model.kwargs."):]] = ast.literal_eval(value)
    try:
        frames, crop = int(p["clip.frames"]), int(p["clip.crop_size"])
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        arch = p["model.name"]
        return count_params(arch, **kwargs) / 1e6, count_flops(arch, (frames, crop, crop), **kwargs) / 1e9
    except (KeyError, ValueError, TypeError, RuntimeError):
        return None, None


def collect(experiment, out: Path, *, study: str | None = None, tune: str | None = None) -> tuple[str, list[ModelRow]]:
    """The rows of the report, with their curves (drawn from the metric history) and confusion matrices (the
    evaluate run's PNG) written under `out`/img."""
    from action3d.plots import plot_history

    title, runs = experiment.scope(TRAINING_STAGES, study=study, tune=tune)
    rows = []
    for i, run in enumerate(runs):
        m = run.metrics
        row = ModelRow(_label(run), run.run_id, run.stage, run.params.get("model.name", "?"), *_cost(run),
                       m.get("final_train_top1"), m.get("model_val_video_top1", m.get("best_val_video_top1")),
                       run.minutes)
        history = experiment.history(run.run_id, HISTORY_KEYS)
        if row.train_top1 is None:  # a run stopped early (a pruned trial): its last epoch, its best so far
            row.train_top1 = m.get("train_top1")
        if row.val_video_top1 is None:
            row.val_video_top1 = max((h["val_video_top1"] for h in history if "val_video_top1" in h), default=None)
        slug = f"img/{i:02d}-{run.stage.replace('@', '-')}"
        if history:
            row.curves = f"{slug}-curves.png"
            plot_history(history, out / row.curves, title=row.label)
        evaluation = experiment.evaluation(run.run_id)
        if evaluation is not None:
            row.test = dict(evaluation.metrics)
            fetched = experiment.fetch(evaluation.run_id, "confusion.png", out / "img" / "fetched")
            if fetched is not None:  # a run without the PNG: the table stands
                row.confusion = f"{slug}-confusion.png"
                fetched.replace(out / row.confusion)
        rows.append(row)
    shutil.rmtree(out / "img" / "fetched", ignore_errors=True)
    return title, rows


def champion(name: str, uri: str, root: Path) -> dict[str, Any] | None:
    """The champion version, its registry row and its lineage with the dvc.lock outputs its data digests match."""
    from action3d.tracking.registry import RegistryError, lineage, registry_versions

    try:
        chain = lineage(f"models:/{name}@champion", tracking_uri=uri)
    except RegistryError:
        return None
    version = chain["model"].rsplit("/", 1)[1]
    row = next(r for r in registry_versions(name, tracking_uri=uri) if r["version"] == version)
    return {"name": name, **row, "lineage": locate_data(chain, root)}


def locate_data(chain: dict[str, Any], root: Path) -> dict[str, Any]:
    """`chain` (tracking.registry.lineage) with, per run, where its data digests are outputs of the project's
    dvc.lock (`in_dvc_lock`: context -> paths): `git checkout <commit> && dvc checkout` brings back that data."""
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


class _Page:
    """The report written twice from the same calls: Markdown (README.md) and HTML (index.html)."""

    def __init__(self, heading: str):
        self.md = [f"# {heading}", ""]
        self.html = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title><style>"
                     "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
                     "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
                     "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#eef3f8}"
                     "img{max-width:100%;margin:.5em 0}.note{color:#555}table.lineage td{text-align:left}"
                     "pre{background:#f6f8fa;padding:1em}</style></head><body>", f"<h1>{html.escape(heading)}</h1>"]

    def section(self, title: str) -> None:
        self.md += [f"## {title}", ""]
        self.html.append(f"<h2>{html.escape(title)}</h2>")

    def text(self, line: str, note: bool = False) -> None:
        self.md += [line, ""]
        self.html.append(f"<p{' class=note' if note else ''}>{html.escape(line)}</p>")

    def lines(self, lines: list[str]) -> None:
        self.md += ["```", *lines, "```", ""]
        self.html.append("<pre>" + html.escape("\n".join(lines)) + "</pre>")

    def table(self, head: list[str], body: list[list[str]], css: str = "") -> None:
        self.md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in body],
                    ""]
        self.html += [f"<table{f' class={css}' if css else ''}><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                      + "</tr>", *["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body],
                      "</table>"]

    def image(self, caption: str, path: str) -> None:
        self.md += [f"**{caption}**", "", f"![{caption}]({path})", ""]
        self.html.append(f"<h3>{html.escape(caption)}</h3><img src='{html.escape(path)}' alt='{html.escape(caption)}'>")

    def write(self, out: Path) -> Path:
        # the page counts the images it could show (body data-images="loaded/all"): a browser check reads it
        self.html += ["<script>addEventListener('load', () => { const all = [...document.images]; document.body.dataset"
                      ".images = all.filter(i => i.complete && i.naturalWidth > 0).length + '/' + all.length; });"
                      "</script>", "</body></html>"]
        write_atomic_text(out / "README.md", "\n".join(self.md) + "\n")
        return write_atomic_text(out / "index.html", "\n".join(self.html) + "\n")


def write_report(out: Path, *, tracking_uri: str, experiment: str, model_name: str, root: Path,
                 study: str | None = None, tune: str | None = None) -> Path:
    """reports/index.html and reports/README.md (same content) with images in reports/img/. Returns index.html."""
    from action3d.tracking.browse import Experiment

    found = Experiment(tracking_uri, experiment)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "img", ignore_errors=True)  # images of an earlier report must not linger
    title, rows = collect(found, out, study=study, tune=tune)
    page = _Page(f"action3d report: {title}")
    page.text(f"experiment `{experiment}` in `{shareable_uri(tracking_uri)}`, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", note=True)
    if not (study or tune):
        lines = findings(root / "runs")
        if lines:
            page.section("What the pipeline shows")
            page.lines(lines)
    page.text("Accuracies in %. Test: video level (clip softmax averaged over every window), as in Hara et al.'s "
              "tables.", note=True)
    page.table(*_table(rows))
    if not rows:
        page.text("No training runs found: run the pipeline (`make run`).")
    best = champion(model_name, tracking_uri, root) if not (study or tune) else None
    if best:
        key = best.get("metric_key")
        score = f"{key} {best[key]:.4f}" if key in best else "no test metric"
        page.section("Champion")
        page.text(f"{best['name']} v{best['version']} ({', '.join(best['aliases'])}): {score} on test data "
                  f"{(best['data_digest'] or '?')[:12]}; git commit {(best['git_commit'] or '?')[:10]}")
        cells = [[run["run_id"][:12], str(run.get("stage")), (run.get("git_commit") or "?")[:10],
                  ", ".join(f"{k} {v[:12]}" for k, v in run.get("data", {}).items()),
                  "; ".join(p for paths in run.get("in_dvc_lock", {}).values() for p in paths) or "-"]
                 for run in best["lineage"]["runs"]]
        page.table(["run", "stage", "git commit", "data", "in dvc.lock"], cells, css="lineage")
    images = [(f"{r.label}: {kind}", path) for r in rows for kind, path in (("training curves", r.curves),
                                                                             ("test confusion matrix", r.confusion)) if path]
    if images:
        page.section("Curves and confusion matrices")
        for caption, path in images:
            page.image(caption, path)
    return page.write(out)
