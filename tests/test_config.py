"""Config precedence (defaults < YAML < overrides), strictness, shipped presets."""

import pytest
import yaml

from cai.config import RunConfig, describe, list_presets, load_config, parse_override
from cai.errors import CaiError


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"seed": 5, "engine": {"batch_size": 4, "cache": True}}))
    assert load_config().seed == RunConfig().seed
    cfg = load_config(str(path))
    assert (cfg.seed, cfg.engine.batch_size, cfg.engine.model) == (5, 4, "default")
    cfg = load_config(str(path), ["engine.batch_size=2", "engine.cache=false"])
    assert cfg.engine.batch_size == 2
    assert cfg.engine.cache is False  # a command-line false beats a YAML true
    assert cfg.seed == 5


def test_override_values_read_as_yaml():
    assert parse_override("stages=[prepare]") == {"stages": ["prepare"]}
    assert parse_override("data.max_per_split=null") == {"data": {"max_per_split": None}}
    assert parse_override("engine.model='8'") == {"engine": {"model": "8"}}
    assert parse_override("run_dir=a=b") == {"run_dir": "a=b"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["engine.batchsize=3"], r"unknown key 'engine.batchsize'"),
        (["engine.batch_size=many"], r"field 'engine.batch_size' expects an integer, got 'many'"),
        (["engine.cache=maybe"], r"'engine.cache' expects true or false"),
        (["engine.dtype=float8"], r"'engine.dtype' must be one of"),
        (["seed"], r"is not KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(CaiError, match=message):
        load_config(None, overrides)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  batch_size: [1\n")
    with pytest.raises(CaiError, match=r"c.yaml:\d+: not valid YAML"):
        load_config(str(path))
    path.write_text("engine:\n  modle: x\n")
    with pytest.raises(CaiError, match=rf"{path}: unknown key 'engine.modle'"):
        load_config(str(path))
    with pytest.raises(CaiError, match="no config file or preset named 'nope'"):
        load_config("nope")


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_validates(preset):
    from cai.inputs import load_inputs
    from cai.stage_names import STAGES

    cfg = load_config(preset)
    assert set(cfg.stages) <= set(STAGES)
    load_inputs(cfg)  # the constitution and prompt sets it names load


def test_every_field_has_help():
    rows = describe()
    assert rows and all(help_.strip() for _, _, help_ in rows)


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  learning_rate: 1e-5\n")
    assert load_config(str(path)).sft.learning_rate == 1e-5
    assert load_config(None, ["sft.learning_rate=3e-4"]).sft.learning_rate == 3e-4
    with pytest.raises(CaiError, match="expects a number"):
        load_config(None, ["sft.learning_rate=fast"])
