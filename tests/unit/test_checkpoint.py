"""Checkpoints in and out (ours and the reference's), head replacement, fine-tuning freezes."""

import pytest
import torch
from torch import nn

from action3d.models import (
    CheckpointMismatchError,
    checkpoint_state,
    create_model,
    freeze_before,
    load_pretrained,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

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

    path = save_checkpoint(checkpoint_state(model, epoch=3, optimizer=optimizer.state_dict()), tmp_path / "ck.pth")
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
    save_checkpoint(checkpoint_state(_small(), epoch=1), path)
    save_checkpoint(checkpoint_state(_small(), epoch=2), path)
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
    with pytest.raises(ValueError, match="does not say how to rebuild"):
        model_from_checkpoint(path)


def test_other_class_count_loads_the_trunk_and_keeps_a_fresh_head(tmp_path):
    source = _small(n_classes=7)
    path = save_checkpoint(checkpoint_state(source), tmp_path / "pretrain.pth")

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
    path = save_checkpoint(checkpoint_state(create_model("densenet121", n_classes=6, **kwargs)), tmp_path / "d.pth")
    target = create_model("densenet121", n_classes=2, **kwargs)
    assert load_pretrained(target, path).head_replaced
    assert target.classifier.out_features == 2


def test_type_a_checkpoint_into_type_b_model_names_key_and_knob(tmp_path):
    path = save_checkpoint(checkpoint_state(_small(shortcut_type="A")), tmp_path / "a.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(create_model("resnet10", **SMALL, shortcut_type="B"), path)
    message = str(err.value)
    assert "'layer2.0.downsample.0.weight' (shape (16, 8, 1, 1, 1)) is in the model but not" in message
    assert "shortcut_type='A'" in message

    path = save_checkpoint(checkpoint_state(_small(shortcut_type="B")), tmp_path / "b.pth")
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
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(path)


def _frozen_bn_stats(model, prefixes):
    return {
        k: v.clone() for k, v in model.state_dict().items()
        if k.startswith(prefixes) and k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }  # fmt: skip


def test_freeze_before_layer4_trains_conv5_and_fc_only():
    model = _small(n_classes=4)
    trainable = freeze_before(model, "layer4")
    expected = [*model.layer4.parameters(), *model.fc.parameters()]
    assert [id(p) for p in trainable] == [id(p) for p in expected]

    frozen_prefixes = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
    frozen_weights = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(frozen_prefixes)}
    frozen_stats = _frozen_bn_stats(model, frozen_prefixes)
    layer4_mean = model.layer4[0].bn1.running_mean.clone()
    keys_before = list(model.state_dict())

    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model.train()  # the engine does this every epoch: frozen BNs must stay frozen anyway
    assert not model.bn1.training and model.layer4[0].bn1.training
    nn.functional.cross_entropy(model(torch.randn(CLIP)), torch.tensor([0, 3])).backward()
    optimizer.step()

    assert all(p.grad is None for name, p in model.named_parameters() if name.startswith(frozen_prefixes))
    assert all(p.grad is not None for p in trainable)
    assert _same_tensors({k: model.state_dict()[k] for k in frozen_weights}, frozen_weights)
    assert _same_tensors({k: model.state_dict()[k] for k in frozen_stats}, frozen_stats)
    assert not torch.equal(model.layer4[0].bn1.running_mean, layer4_mean)
    assert list(model.state_dict()) == keys_before  # still loads reference checkpoints
    assert isinstance(model.bn1, nn.BatchNorm3d)


def test_freeze_before_classifier_alias_and_unfreezing():
    model = create_model("densenet121", n_classes=3, growth_rate=4, num_init_features=8)
    assert [id(p) for p in freeze_before(model, "fc")] == [id(p) for p in model.classifier.parameters()]
    norm5 = model.features.norm5
    assert type(norm5) is not nn.BatchNorm3d and not norm5.train().training

    assert len(freeze_before(model, "denseblock4")) > len(list(model.classifier.parameters()))
    assert type(norm5) is nn.BatchNorm3d

    everything = freeze_before(model, "")
    assert len(everything) == len(list(model.parameters()))
    model.train()
    assert all(m.training for m in model.modules())


def test_freeze_before_unknown_module_lists_the_choices():
    with pytest.raises(ValueError, match=r"'layer5'.*conv1, bn1, layer1, layer2, layer3, layer4, fc"):
        freeze_before(_small(), "layer5")
