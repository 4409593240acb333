import pytest

from pipeline.errors import ConfigError
from pipeline.overrides import apply_overrides, expand_key, parse_override


def test_values_are_parsed_as_yaml():
    assert parse_override("a.b=200") == (["a", "b"], 200)
    assert parse_override("lr=1e-3")[1] == pytest.approx(1e-3)
    assert parse_override("flag=true")[1] is True
    assert parse_override("ks=[1, 5, 10]")[1] == [1, 5, 10]
    assert parse_override("x=null")[1] is None
    assert parse_override("name=hello world")[1] == "hello world"


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_malformed_overrides_are_one_line_errors(bad):
    with pytest.raises(ConfigError) as err:
        parse_override(bad, source="cfg.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("cfg.yaml: override")


def test_stage_shorthand_targets_params():
    stages = ["pretrain"]
    assert expand_key(["pretrain", "steps"], stages) == ["stages", "pretrain", "params", "steps"]
    assert expand_key(["pretrain", "resources", "cpus"], stages) == ["stages", "pretrain", "resources", "cpus"]
    assert expand_key(["seed"], stages) == ["seed"]
    assert expand_key(["ray", "num_cpus"], stages) == ["ray", "num_cpus"]


def test_apply_creates_missing_levels_and_refuses_scalars():
    raw = {"seed": 0, "stages": {"pretrain": {"type": "x"}}}
    apply_overrides(raw, ["pretrain.steps=5", "seed=3", "storage.region=eu-west-1"])
    assert raw["stages"]["pretrain"]["params"] == {"steps": 5}
    assert raw["seed"] == 3 and raw["storage"] == {"region": "eu-west-1"}
    with pytest.raises(ConfigError, match="seed is not a mapping"):
        apply_overrides(raw, ["seed.x=1"])


def test_yaml_reads_exponent_floats_without_a_dot():
    from pipeline.yamlio import safe_load

    assert safe_load("lr: 1e-3\nwd: 3.0e-2\nsteps: 10\nname: 1e3x") == {"lr": 1e-3, "wd": 3e-2, "steps": 10, "name": "1e3x"}
