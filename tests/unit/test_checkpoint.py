"""action3d.checkpoint: ours and the reference's files in, atomic writes, resume state, head replacement, and
one clear error for a file that is not a checkpoint."""

import errno
import pickle
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from action3d.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    capture_rng_state,
    copy_checkpoint,
    make_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from action3d.errors import Action3dError
from action3d.models import create_model
from action3d.models.registry import registry_name, unwrap_model
from action3d.models.transfer import check_fits, load_pretrained, model_from_checkpoint

CLIP = (2, 3, 8, 32, 32)
SMALL = {"widen_factor": 0.125}  # ResNet wiring with 8..64 channels: fast, same keys


def _small(name="resnet10", **kwargs):
    torch.manual_seed(0)
    return create_model(name, **{**SMALL, **kwargs})


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_our_checkpoint_rebuilds_the_model_with_no_outside_knowledge(tmp_path):
    model = _small(n_classes=7, shortcut_type="A")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(CLIP)).sum().backward()
    optimizer.step()

    path = save_checkpoint(make_checkpoint(model, epoch=3, optimizer=optimizer), tmp_path / "ck.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temporary file left behind

    rebuilt = model_from_checkpoint(path)
    assert rebuilt.arch == "resnet10"
    assert rebuilt.model_kwargs == {"widen_factor": 0.125, "n_classes": 7, "shortcut_type": "A"}
    assert _same_tensors(rebuilt.state_dict(), model.state_dict())
    x = torch.randn(CLIP)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 3
    assert ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "runs" / "last.pth"
    save_checkpoint(make_checkpoint(_small(), epoch=1), path)
    save_checkpoint(make_checkpoint(_small(), epoch=2), path)
    assert read_checkpoint(path)["epoch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]


def test_bare_state_dict_with_module_prefix_loads(tmp_path):
    source = _small()
    path = tmp_path / "dp.pth"
    torch.save(nn.DataParallel(source).state_dict(), path)  # keys "module.conv1.weight", ...
    assert next(iter(torch.load(path, weights_only=True))).startswith("module.")

    target = create_model("resnet10", **SMALL)
    info = load_pretrained(target, path)
    assert _same_tensors(target.state_dict(), source.state_dict())
    assert (info.arch, info.epoch, info.head_replaced) == (None, None, False)


def test_reference_style_checkpoint_loads(tmp_path):
    source = _small(n_classes=400)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "r3d10_K_200ep.pth"
    torch.save({"arch": "resnet-10", "epoch": 200, "state_dict": state, "optimizer": optimizer.state_dict()}, path)

    target = create_model("resnet10", **SMALL)
    info = load_pretrained(target, path)
    assert _same_tensors(target.state_dict(), source.state_dict())
    assert (info.arch, info.epoch, info.n_pretrain_classes, info.head_replaced) == ("resnet-10", 200, 400, False)
    with pytest.raises(CheckpointError, match="does not say how to rebuild"):
        model_from_checkpoint(path)


def test_other_class_count_loads_the_trunk_and_keeps_a_fresh_head(tmp_path):
    source = _small(n_classes=7)
    path = save_checkpoint(make_checkpoint(source), tmp_path / "pretrain.pth")

    target = create_model("resnet10", **SMALL, n_classes=3)
    fresh_head = target.fc.weight.clone()
    info = load_pretrained(target, path)
    assert (info.n_pretrain_classes, info.head_replaced) == (7, True)
    assert torch.equal(target.fc.weight, fresh_head)
    trunk = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(target.state_dict()[k], v) for k, v in trunk.items())

    rebuilt = model_from_checkpoint(path, n_classes=3)
    assert rebuilt.fc.out_features == 3
    assert rebuilt.model_kwargs["n_classes"] == 3
    assert torch.equal(rebuilt.layer4[0].conv1.weight, source.layer4[0].conv1.weight)


def test_densenet_head_replacement_uses_its_classifier(tmp_path):
    kwargs = {"growth_rate": 4, "num_init_features": 8}
    path = save_checkpoint(make_checkpoint(create_model("densenet121", n_classes=6, **kwargs)), tmp_path / "d.pth")
    target = create_model("densenet121", n_classes=2, **kwargs)
    assert load_pretrained(target, path).head_replaced
    assert target.classifier.out_features == 2


def test_type_a_checkpoint_into_type_b_model_names_key_and_knob(tmp_path):
    path = save_checkpoint(make_checkpoint(_small(shortcut_type="A")), tmp_path / "a.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(create_model("resnet10", **SMALL, shortcut_type="B"), path)
    message = str(err.value)
    assert "'layer2.0.downsample.0.weight' (shape (16, 8, 1, 1, 1)) is in the model but not" in message
    assert "shortcut_type='A'" in message

    path = save_checkpoint(make_checkpoint(_small(shortcut_type="B")), tmp_path / "b.pth")
    with pytest.raises(CheckpointMismatchError, match="shortcut_type='B'"):
        load_pretrained(create_model("resnet10", **SMALL, shortcut_type="A"), path)


def test_depth_and_shape_mismatches_name_the_key_both_shapes_and_the_fix(tmp_path):
    path = tmp_path / "ref.pth"
    torch.save({"arch": "resnet-10", "epoch": 1, "state_dict": _small().state_dict()}, path)

    with pytest.raises(CheckpointMismatchError, match=r"'layer1\.1\.conv1\.weight'.*arch='resnet-10'.*model name"):
        load_pretrained(create_model("resnet18", **SMALL), path)
    with pytest.raises(CheckpointMismatchError, match=r"'conv1\.weight' has shape \(8, 3, 7, 7, 7\) in the checkpoint "
                       r"but \(8, 2, 7, 7, 7\) in the model.*n_input_channels"):
        load_pretrained(create_model("resnet10", **SMALL, n_input_channels=2), path)


class _NotATensor:
    pass


def test_files_that_would_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*_NotATensor.*weights_only=True.*re-save only its weights"):
        read_checkpoint(path)


def _bad_files(folder):
    """Files a user may pass where a checkpoint belongs, with what the error must say about each."""
    good = folder / "good.pt"
    torch.save({"arch": "resnet10", "state_dict": {"w": torch.zeros(64)}}, good)
    files = {
        "video.mp4": (b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4, "looks like a video"),
        "notes.txt": (b"epoch 3: loss 0.2\n", "looks like a text file"),
        "empty.pt": (b"", "empty"),
        "truncated.pt": (good.read_bytes()[:200], "damaged PyTorch file"),
        "plain.pkl": (pickle.dumps({"state_dict": [1, 2]}), "not a file torch can read"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    torch.save(_NotATensor(), folder / "object.pt")
    torch.save(nn.Linear(2, 3), folder / "module.pt")
    torch.save({"epoch": 3, "lr": 0.1}, folder / "no_state_dict.pt")
    torch.save({"state_dict": "weights.bin"}, folder / "odd_state_dict.pt")
    torch.save(torch.zeros(3), folder / "tensor.pt")
    return {
        **{name: why for name, (_, why) in files.items()},
        "object.pt": r"_NotATensor.*re-save only its weights",
        "module.pt": r"torch\.nn\.modules\.linear\.Linear.*m\.state_dict\(\)",
        "no_state_dict.pt": r"neither a 'state_dict' entry.*'epoch', 'lr'",
        "odd_state_dict.pt": "'state_dict' is not a dict of tensors",
        "tensor.pt": "holds a Tensor",
        "missing.pt": "no such file",
        ".": "directory",
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, _bad_files(folder)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["video.mp4", "notes.txt", "empty.pt", "truncated.pt", "plain.pkl", "object.pt",
                                  "module.pt", "no_state_dict.pt", "odd_state_dict.pt", "tensor.pt", "missing.pt",
                                  "."])  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_is_one_clear_error(bad_files, name):
    folder, why = bad_files
    path = folder / name
    for read in (read_checkpoint, model_from_checkpoint, lambda p: load_pretrained(_small(), p)):
        with pytest.raises(CheckpointError) as err:
            read(path)
        message = str(err.value)
        assert str(path) in message and re.search(why[name], message), message
        assert "3D-ResNets-PyTorch" in message  # what was expected
        assert isinstance(err.value, Action3dError)  # the CLI prints it: no traceback


def test_save_failure_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = save_checkpoint(make_checkpoint(_small(), epoch=1), tmp_path / "last.pt")

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"could not write .*last\.pt: .*No space left.*untouched"):
        save_checkpoint(make_checkpoint(_small(), epoch=2), path)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert copy_checkpoint(path, tmp_path / "best.pt").is_file() and read_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left behind
    with pytest.raises(CheckpointError, match=r"could not write .*best\.pt"):
        copy_checkpoint(tmp_path / "gone.pt", tmp_path / "best.pt")


def test_resume_state_round_trip_without_wrapper_prefixes(tmp_path):
    model = _small(n_classes=3)
    compiled = torch.compile(model)  # lazy: nothing compiles until a forward pass
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = make_checkpoint(compiled, epoch=7, optimizer=optimizer, best_metric=0.5, extra={"run_id": "abc"})
    assert set(state["state_dict"]) == set(model.state_dict())  # no "_orig_mod." prefixes
    assert (state["arch"], state["model_kwargs"]) == ("resnet10", {**SMALL, "n_classes": 3})
    path = save_checkpoint(state, tmp_path / "sub" / "ck.pt")
    loaded = read_checkpoint(path)
    assert loaded["epoch"] == 7 and loaded["best_metric"] == 0.5 and loaded["run_id"] == "abc"
    fresh = _small(n_classes=3)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.5)
    assert restore_checkpoint(loaded, fresh, optimizer=fresh_optimizer) == 7
    assert _same_tensors(fresh.state_dict(), model.state_dict())
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1
    with pytest.raises(CheckpointMismatchError, match="does not fit"):
        restore_checkpoint(loaded, _small(n_classes=5))
    with pytest.raises(ValueError, match="'epoch' would overwrite"):
        make_checkpoint(model, extra={"epoch": 1})
    with pytest.raises(ValueError, match="no `arch`"):
        make_checkpoint(nn.Linear(2, 2))
    assert make_checkpoint(nn.Linear(2, 2), arch="tiny", model_kwargs={})["arch"] == "tiny"


def test_rng_state_round_trip_with_loader_generators():
    generator = torch.Generator().manual_seed(5)
    state = capture_rng_state([generator])
    draws = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator))
    restore_rng_state(state, [generator])
    assert (random.random(), np.random.rand()) == draws[:2]
    assert torch.equal(torch.rand(1), draws[2]) and torch.equal(torch.rand(1, generator=generator), draws[3])
    with pytest.warns(UserWarning, match="data order after resuming will differ"):
        restore_rng_state(state, [])


def test_unwrap_model_sees_through_every_wrapper():
    model = _small()
    assert unwrap_model(torch.compile(nn.DataParallel(model))) is model
    assert unwrap_model(model) is model


def test_a_published_checkpoint_is_checked_against_the_model_from_its_keys_and_arch(tmp_path):
    """What the check stage asks before any stage runs: the file says `arch` 'resnet-18' (3D-ResNets-PyTorch's
    "<model>-<depth>") and holds resnet18's keys and shapes, any class count; another depth or another model name
    is named with the knob to change."""

    assert (registry_name("resnet-18"), registry_name("resnext-101"), registry_name("preresnet-34"),
            registry_name("resnet2p1d-18"), registry_name("resnet18"), registry_name("vgg-16")) == (
        "resnet18", "resnext101", "preact_resnet34", "r2plus1d18", "resnet18", None)
    r18 = create_model("resnet18", n_classes=400, **SMALL)
    published = tmp_path / "r3d18_K_200ep.pth"
    torch.save({"epoch": 200, "arch": "resnet-18", "state_dict": {f"module.{k}": v for k, v in r18.state_dict().items()},
                "optimizer": {}}, published)
    check_fits(published, "resnet18", SMALL, knob="finetune.pretrained")  # fits: 400 classes or any other
    with pytest.raises(CheckpointMismatchError, match=r"finetune.pretrained .* is a resnet-18 .* model.name is "
                                                      r"resnet34: set model.name: resnet18"):
        check_fits(published, "resnet34", SMALL, knob="finetune.pretrained")
    nameless = tmp_path / "nameless.pth"
    torch.save({"state_dict": create_model("resnet34", n_classes=400, **SMALL).state_dict()}, nameless)
    with pytest.raises(CheckpointMismatchError, match=r"finetune.pretrained: .*nameless.pth does not fit model "
                                                      r"'resnet18': 'layer1.2"):
        check_fits(nameless, "resnet18", SMALL, knob="finetune.pretrained")
    with pytest.raises(CheckpointMismatchError, match="widen_factor"):
        check_fits(published, "resnet18", {"widen_factor": 0.25}, knob="finetune.pretrained")
