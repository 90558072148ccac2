"""models/transfer.py: the paper's fine-tuning freezes (frozen layers, frozen BatchNorm statistics), new heads."""

import pytest
import torch
from torch import nn

from action3d.models import create_model
from action3d.models.transfer import freeze_before, replace_classifier

CLIP = (2, 3, 8, 32, 32)
SMALL = {"widen_factor": 0.125}


def _small(name="resnet10", **kwargs):
    torch.manual_seed(0)
    return create_model(name, **{**SMALL, **kwargs})


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def test_replace_classifier_swaps_the_head_and_records_the_class_count():
    model = _small(n_classes=4)
    head = replace_classifier(nn.DataParallel(model), 9)
    assert model.fc is head and head.out_features == 9 and model.model_kwargs["n_classes"] == 9
    assert model(torch.randn(CLIP)).shape == (2, 9)
