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
    if "time_shuffled_video_top1" in finetuned:
        shuffled, chance = finetuned["time_shuffled_video_top1"], finetuned["chance"]
        verdict = "near chance: the model uses motion" if shuffled <= chance + 0.15 else "well above chance"
        lines.append(f"  same model, frames shuffled   video top-1 {_pct(shuffled)}   (chance {_pct(chance)}: {verdict})")
    if "train_video_top1" in finetuned:
        lines.append(f"                                its training videos {_pct(finetuned['train_video_top1'])}")
    if scratch is not None:
        gain = 100 * (finetuned["video_top1"] - scratch["video_top1"])
        lines.append(f"  from scratch (the baseline)   video top-1 {_pct(scratch['video_top1'])}   "
                     f"(pretraining is worth {gain:+.1f} points)")
        fit = scratch.get("train_video_top1")
        if fit is not None:
            verdict = ("it fits them: a fair baseline" if fit >= FITS else
                       "it does not fit them: tune the scratch knobs before trusting the gain")
            lines.append(f"                                its training videos {_pct(fit)} ({verdict})")
    if registration is not None:
        lines += ["", f"  registered model  {registration['name']} version {registration['version']}, alias "
                      f"{registration['alias'] or '(none)'}: {registration['reason']}",
                  f"                    load it with mlflow.pyfunc.load_model('models:/{registration['name']}@champion')"]
    uri = shareable_uri(tracking_uri())  # printed, so no password; a sqlite path relative to the project root
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
