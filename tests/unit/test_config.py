import pydantic
import pytest

from action3d.config import ParamsError, load_params


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_defaults_when_no_file_is_given():
    params = load_params(None)
    assert params.finetune.lr == pytest.approx(1e-3)
    assert params.scratch.pretrain.lr == pytest.approx(0.1)
    assert params.scratch.finetune.epochs == params.finetune.epochs  # the baseline's budget: fine-tuning's


def test_file_values_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "finetune:\n  lr: 0.05\nmodel:\n  name: resnet10\n")
    params = load_params(path, ["finetune.lr=0.01", "model.kwargs={widen_factor: 0.5}", "scratch.pretrain.bf16=false",
                                "data={finetune: {path: data/ucf101, layout: ucf101}}"])
    assert params.finetune.lr == pytest.approx(0.01)
    assert params.model.name == "resnet10"
    assert params.model.kwargs == {"widen_factor": 0.5}
    assert params.scratch.pretrain.bf16 is False
    assert list(params.data) == ["finetune"] and params.data["finetune"].path == "data/ucf101"


def test_unknown_key_in_file_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "finetune:\n  lrr: 0.05\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert "finetune.lrr" in str(err.value)
    assert "finetune.lr" in str(err.value).split("Did you mean")[1]
    assert str(path) in str(err.value)


def test_unknown_override_and_bad_value_are_named(tmp_path):
    with pytest.raises(ParamsError, match="scratch.pretrain.epoch'"):
        load_params(None, ["scratch.pretrain.epoch=3"])
    with pytest.raises(ParamsError, match="'data': no finetune set"):
        load_params(None, ["data={pretrain: {path: data/k400, layout: kinetics}}"])
    with pytest.raises(ParamsError, match="data.finetune.layout"):
        load_params(None, ["data.finetune.layout=ucf"])
    with pytest.raises(ParamsError, match="split.split"):
        load_params(None, ["split.split=4"])
    with pytest.raises(ParamsError, match="key=value"):
        load_params(None, ["finetune.lr"])


def test_params_are_frozen_and_flatten_to_dotted_keys(tmp_path):
    params = load_params(None)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        params.finetune.lr = 1.0
    flat = params.flat()
    assert flat["finetune.ft_begin_module"] == "layer4"
    assert flat["synth.sets.pretrain.classes"] == 24 and flat["data.finetune.layout"] == "ucf101"
    assert flat["tracking.tags"] == {}  # an empty mapping stays one value
    assert params.digest() != load_params(None, ["seed=1"]).digest()


def test_a_cosine_schedule_shorter_than_its_warmup_is_refused_naming_both_knobs():
    with pytest.raises(ParamsError, match=r"finetune.*epochs \(1\) > warmup_epochs \(1\)"):
        load_params("params.yaml", ["finetune.epochs=1", "finetune.scheduler=cosine", "finetune.warmup_epochs=1"])


def test_a_missing_params_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ParamsError, match=r"nope\.yaml: no such params file"):
        load_params(tmp_path / "nope.yaml")
