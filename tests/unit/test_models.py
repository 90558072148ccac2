"""The model zoo: registry, every network's forward pass, sizes and costs against the reference."""

import json
import subprocess
import sys

import pytest
import torch

from action3d.cli import format_model_table
from action3d.models import create_model, list_models, model_family, register_model
from action3d.models.summary import TABLE, count_flops, count_params, model_table

EXPECTED_MODELS = (
    [f"densenet{d}" for d in (121, 169, 201, 264)]
    + [f"preact_resnet{d}" for d in (10, 18, 34, 50, 101, 152, 200)]
    + [f"r2plus1d{d}" for d in (10, 18, 34, 50, 101, 152, 200)]
    + [f"resnet{d}" for d in (10, 18, 34, 50, 101, 152, 200)]
    + [f"resnext{d}" for d in (50, 101, 152)]
    + ["wide_resnet50"]
)

# Same wiring, fewer channels: keeps the every-model forward test fast on a CPU.
NARROW = {
    "resnet": {"widen_factor": 0.125},
    "preact_resnet": {"widen_factor": 0.125},
    "r2plus1d": {"widen_factor": 0.125},
    "wide_resnet": {"widen_factor": 0.125},
    "resnext": {"widen_factor": 0.25, "cardinality": 8},
    "densenet": {"growth_rate": 4, "num_init_features": 8},
}

# DenseNet's three transitions plus the stem halve T, H, W five times: 16 x 32 x 32 is its smallest clip.
TINY_CLIP = (1, 3, 16, 32, 32)


def test_registry_holds_the_zoo():
    assert list_models() == EXPECTED_MODELS
    assert model_family("r2plus1d50") == "r2plus1d"
    assert model_family("wide_resnet50") == "wide_resnet"


def test_registering_a_name_twice_fails():
    def resnet18(**kwargs):  # same name as the registered one
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="registered twice"):
        register_model(resnet18)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18"):
        create_model("resnet19")


def test_none_kwargs_keep_builder_defaults_and_kwargs_are_recorded():
    with torch.device("meta"):
        model = create_model("resnet10", n_classes=None, shortcut_type=None, conv1_t_size=3)
    assert model.fc.out_features == 400
    assert model.layer2[0].downsample is not None  # type B, the default
    assert model.conv1.kernel_size == (3, 7, 7)
    assert (model.arch, model.model_kwargs) == ("resnet10", {"conv1_t_size": 3})


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_a_forward_pass(name):
    torch.manual_seed(0)
    model = create_model(name, n_classes=5, **NARROW[model_family(name)]).eval()
    with torch.no_grad():
        logits = model(torch.randn(TINY_CLIP))
    assert logits.shape == (1, 5)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_model_at_full_width_runs_a_forward_pass(name):
    model = create_model(name, n_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(TINY_CLIP))
    assert logits.shape == (1, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {"shortcut_type": "A"}),
        ("resnet50", {"shortcut_type": "A"}),
        ("r2plus1d18", {"shortcut_type": "A", "no_max_pool": True}),
        ("resnet18", {"n_input_channels": 2, "conv1_t_size": 3, "conv1_t_stride": 2}),
    ],
)
def test_knobs_build_and_run(name, kwargs):
    model = create_model(name, n_classes=3, widen_factor=0.125, **kwargs).eval()
    x = torch.randn(1, kwargs.get("n_input_channels", 3), 16, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (1, 3)
    if kwargs.get("shortcut_type") == "A":
        assert not any(".downsample." in key for key in model.state_dict())


# Millions of parameters at n_classes=400, to one decimal, as the reference implementation's.
PARAMS_M = [
    ("resnet10", "B", 14.6), ("resnet10", "A", 14.4),
    ("resnet18", "B", 33.4), ("resnet18", "A", 33.2),
    ("resnet34", "B", 63.7), ("resnet34", "A", 63.5),
    ("resnet50", "B", 47.0), ("resnet50", "A", 44.2),
    ("resnet101", "B", 86.1), ("resnet101", "A", 83.3),
    ("resnet152", "B", 118.2), ("resnet152", "A", 115.4),
    ("resnet200", "B", 127.4), ("resnet200", "A", 124.6),
    ("preact_resnet200", "B", 127.4),
    ("wide_resnet50", "B", 158.2),
    ("resnext50", "B", 26.7), ("resnext101", "B", 48.3), ("resnext152", "B", 66.2),
    ("densenet121", None, 11.7), ("densenet169", None, 19.3), ("densenet201", None, 26.1), ("densenet264", None, 41.4),
    ("r2plus1d18", "B", 33.4), ("r2plus1d50", "B", 47.0),
]  # fmt: skip


@pytest.mark.parametrize(("name", "shortcut_type", "millions"), PARAMS_M)
def test_parameter_counts_match_the_reference(name, shortcut_type, millions):
    assert round(count_params(name, n_classes=400, shortcut_type=shortcut_type) / 1e6, 1) == millions


@pytest.mark.parametrize(("name", "gflops"), [("resnet18", 16.6), ("resnet50", 20.1)])
def test_forward_gflops_at_16x112x112(name, gflops):
    assert round(count_flops(name, (16, 112, 112)) / 1e9, 1) == gflops


# Keys and shapes read off the reference's models/*.py: what its checkpoints hold.
REFERENCE_TENSORS = [
    ("resnet18", "conv1.weight", (64, 3, 7, 7, 7)),
    ("resnet18", "layer2.0.downsample.0.weight", (128, 64, 1, 1, 1)),
    ("resnet18", "layer2.0.downsample.1.running_var", (128,)),
    ("resnet50", "layer1.0.conv3.weight", (256, 64, 1, 1, 1)),
    ("resnet50", "fc.weight", (400, 2048)),
    ("preact_resnet50", "layer2.0.bn1.weight", (256,)),  # pre-activation BN sees the block's input
    ("preact_resnet50", "layer2.0.bn3.weight", (128,)),
    ("wide_resnet50", "conv1.weight", (64, 3, 7, 7, 7)),
    ("wide_resnet50", "layer1.0.conv1.weight", (128, 64, 1, 1, 1)),
    ("wide_resnet50", "fc.weight", (400, 2048)),
    ("resnext101", "layer1.0.conv2.weight", (128, 4, 3, 3, 3)),
    ("resnext101", "layer4.2.conv3.weight", (2048, 1024, 1, 1, 1)),
    ("densenet121", "features.conv1.weight", (64, 3, 7, 7, 7)),
    ("densenet121", "features.denseblock1.denselayer1.norm1.weight", (64,)),
    ("densenet121", "features.denseblock1.denselayer2.conv1.weight", (128, 96, 1, 1, 1)),
    ("densenet121", "features.transition1.conv.weight", (128, 256, 1, 1, 1)),
    ("densenet121", "features.norm5.running_mean", (1024,)),
    ("densenet121", "classifier.weight", (400, 1024)),
    ("r2plus1d18", "conv1_s.weight", (110, 3, 1, 7, 7)),
    ("r2plus1d18", "conv1_t.weight", (64, 110, 7, 1, 1)),
    ("r2plus1d18", "layer1.0.conv1_s.weight", (144, 64, 1, 3, 3)),
    ("r2plus1d18", "layer2.0.conv1_t.weight", (128, 230, 3, 1, 1)),
    ("r2plus1d50", "layer1.0.conv2_s.weight", (144, 64, 1, 3, 3)),
]


@pytest.mark.parametrize(("name", "key", "shape"), REFERENCE_TENSORS)
def test_state_dict_keys_and_shapes_follow_the_reference(name, key, shape):
    with torch.device("meta"):
        state = create_model(name).state_dict()
    assert key in state
    assert tuple(state[key].shape) == shape


def test_model_table_formats_rows():
    rows = [
        {"name": name, "family": model_family(name), "params": count_params(name), "flops": count_flops(name)}
        for name in ("resnet18", "densenet121")
    ]
    lines = format_model_table(rows).splitlines()
    assert lines[0].split() == ["model", "family", "params", "(M)", "GFLOPs"]
    assert lines[2].split() == ["resnet18", "resnet", "33.4", "16.6"]
    assert lines[3].split()[:3] == ["densenet121", "densenet", "11.7"]


@pytest.mark.slow
def test_the_shipped_model_table_is_every_model_measured_now():
    rows = model_table()
    assert [row["name"] for row in rows] == list_models()
    assert all(row["params"] > 0 and row["flops"] > 0 for row in rows)
    assert json.loads(TABLE.read_text()) == rows, "a model changed: run `python -m action3d.models.summary`"


def test_action3d_models_prints_the_shipped_table_filtered():
    done = subprocess.run([sys.executable, "-m", "action3d.cli", "models", "resnet1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:]] == [
        "preact_resnet10", "preact_resnet18", "preact_resnet101", "preact_resnet152",
        "resnet10", "resnet18", "resnet101", "resnet152"]
    assert lines[7].split() == ["resnet18", "resnet", "33.4", "16.6"]
