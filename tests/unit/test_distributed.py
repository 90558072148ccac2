"""The `nproc` knob of the training stages, resolved to a number of processes."""

from __future__ import annotations

import pytest
import torch

from action3d.distributed import resolve_nproc


def test_auto_is_every_visible_gpu_or_one_on_the_cpu():
    assert resolve_nproc("auto") == max(1, torch.cuda.device_count())


def test_auto_is_one_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_nproc("auto") == 1


def test_a_number_is_taken_as_given():
    assert resolve_nproc(3) == 3
    assert resolve_nproc(1) == 1


@pytest.mark.parametrize("bad", [0, -2, "two", True, 1.5])
def test_anything_else_is_an_error(bad):
    with pytest.raises(ValueError, match="nproc"):
        resolve_nproc(bad)
