"""Stage synth: the built-in demo data, a pretraining set (Kinetics layout) and a fine-tuning set (UCF-101)."""

from __future__ import annotations

from pathlib import Path

from action3d.config import Params


def run(params: Params, *, out_dir: str | Path, hmdb51: bool = False, workers: int | None = None) -> dict:
    """Write `out_dir/pretrain` (Kinetics layout) and `out_dir/finetune` (UCF-101 layout; HMDB-51 with `hmdb51`).

    Same params, same bytes: the videos are drawn from `synth.seed`.
    """
    from action3d.data.synthetic import synth_hmdb51, synth_kinetics, synth_ucf101

    s = params.synth
    common = dict(looks=s.looks, seed=s.seed, width=s.width, height=s.height, fps=s.fps, seconds=s.seconds,
                  gop=s.gop, crf=s.crf, workers=workers)
    out_dir = Path(out_dir)
    pretrain = synth_kinetics(out_dir / "pretrain", **s.pretrain.model_dump(), **common)
    finetune = (synth_hmdb51 if hmdb51 else synth_ucf101)(out_dir / "finetune", **s.finetune.model_dump(), **common)
    return {"pretrain_videos": pretrain["videos"], "finetune_videos": finetune["videos"]}
