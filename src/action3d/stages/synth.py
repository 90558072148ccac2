"""Stage synth: the built-in demo data of one role, in the official layout its data.<role>.layout names."""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params, Role
from action3d.errors import Action3dError
from action3d.stages import RunContext

MAKERS = {"kinetics": "synth_kinetics", "ucf101": "synth_ucf101", "hmdb51": "synth_hmdb51"}


def run(params: Params, *, role: Role, out: str | Path, ctx: RunContext | None = None) -> dict:
    """Write the demo set `synth.sets.<role>` into `out`. Same params, same bytes: the videos are drawn from
    `synth.seed`."""
    from action3d.data import synthetic

    knobs = getattr(params.synth.sets, role)
    layout = params.data[role].layout if role in params.data else None
    if knobs is None or layout not in MAKERS:
        raise Action3dError(f"synth.sets.{role} is not set, or data.{role}.layout ({layout}) is not one the demo "
                            f"writes ({', '.join(MAKERS)}): remove synth.sets.{role}, or set both")
    s = params.synth
    made = getattr(synthetic, MAKERS[layout])(
        out, **knobs.model_dump(), seed=s.seed, width=s.width, height=s.height, fps=s.fps,
        seconds=s.seconds, gop=s.gop, crf=s.crf,
    )  # fmt: skip
    return {"videos": made["videos"], "classes": len(made["classes"])}
