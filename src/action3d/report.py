"""`action3d report`: what the pipeline measured, what it registered, and where to look next."""

from __future__ import annotations

import json
from pathlib import Path

from action3d.stages.common import shareable_uri, tracking_uri


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


FITS = 0.9  # a baseline that scores at least this on its own training videos was trained properly


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


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
