"""A file that is not a checkpoint, given where a model belongs, is one clear error from the `action3d` command:
exit status 2, the file named with what was expected, no traceback, and nothing trained or written before it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from action3d.cli import main

from tests.helpers import write_tiny_params

pytestmark = pytest.mark.slow  # the session's tiny data: encoded videos


class _Opaque:
    """Pickled by torch.save, it needs this code to load: the case that asks to re-save the state_dict."""


def _bad_files(folder: Path) -> dict[Path, str]:
    """Each bad file, with a phrase its error must contain."""
    folder.mkdir()
    torch.save({"arch": "resnet10", "state_dict": {"w": torch.zeros(256)}}, folder / "whole.pt")
    files = {
        "notes.txt": b"epoch 3: loss 0.2\n",
        "empty.pt": b"",
        "truncated.pt": (folder / "whole.pt").read_bytes()[:300],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    torch.save(_Opaque(), folder / "object.pt")
    torch.save(nn.Linear(2, 3), folder / "module.pt")
    torch.save({"epoch": 3, "optimizer": {}}, folder / "no_state_dict.pt")
    return {
        folder / "notes.txt": "text file",
        folder / "empty.pt": "empty",
        folder / "truncated.pt": "damaged",
        folder / "object.pt": "re-save only its weights",
        folder / "module.pt": "re-save only its weights",
        folder / "no_state_dict.pt": "neither a 'state_dict'",
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("given_as", ["evaluate --model", "finetune.pretrained", "finetune --pretrained"])
def test_a_file_that_is_not_a_checkpoint_is_one_message_and_exit_2(workdir, capsys, given_as):
    params = str(write_tiny_params(workdir))
    bad = _bad_files(workdir / "bad")
    video = next(p for p in sorted((workdir / "data/demo").rglob("*")) if p.suffix in (".mp4", ".avi", ".mkv"))
    bad[video] = "looks like a video"
    data = ["--manifests", "data/splits/finetune", "--cache", "data/cache/finetune", "--params", params]
    for path, why in bad.items():
        out = workdir / "runs" / path.name
        if given_as == "evaluate --model":
            argv = ["stage", "evaluate", "--model", str(path), "--out", str(out), *data]
        elif given_as == "finetune.pretrained":  # caught by the check stage, before any stage runs
            argv = ["stage", "check", "--out", str(out), "--params", params, "-S", f"finetune.pretrained={path}"]
        else:
            argv = ["stage", "finetune", "--pretrained", str(path), "--out", str(out), *data]
        assert main(argv) == 2, path
        stderr = capsys.readouterr().err
        assert stderr.startswith("action3d: error: ") and "Traceback" not in stderr
        assert str(path) in stderr and why in stderr, stderr
        if given_as == "finetune.pretrained":
            assert "finetune.pretrained" in stderr  # the key to change
        assert "an action3d checkpoint (model.pt written by a training stage) or a 3D-ResNets-PyTorch" in stderr
        assert not out.exists()  # failed before training or evaluating anything
    assert not (workdir / "mlflow.db").exists()
