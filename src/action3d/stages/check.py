"""Stage check: params.yaml as a whole is valid, before any other stage runs.

DVC removes a stage's outputs right before it runs the stage. If a typo in params.yaml (`dvc exp run -S
+finetune.lrr=0.01`) were first noticed by the training stage, its outputs would already be gone. Every stage of
dvc.yaml depends on this stage's output, so DVC runs it first; validation happens when the command loads the
params, and a bad key or value stops the pipeline here with the key named. The output's content never changes,
so a valid change of params re-runs nothing downstream by itself.
"""

from __future__ import annotations

from pathlib import Path

from action3d.atomic import write_atomic_text
from action3d.config import Params

CONTENT = "params.yaml is valid\n"


def run(params: Params, *, out_path: str | Path) -> dict:
    """`params` are already validated (load_params refuses unknown keys and bad values): record that."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(out_path, CONTENT)
    return {"params_digest": params.digest()}
