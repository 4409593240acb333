import copy

import pytest

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError
from tests.conftest import run_cli, smoke_config, write_config


def test_valid_config_fills_defaults_and_resources(tmp_path):
    config = load_config(write_config(tmp_path / "ok.yaml", smoke_config()))
    assert list(config.stages) == ["generate", "transform", "combine"]
    assert config.stages["transform"].params == {"factor": 3, "offset": 0, "work_s": 0.0, "steps": 20}
    assert config.stages["combine"].inputs == {"transform": "transform"}  # list shorthand
    assert config.stages["generate"].resources is not None and config.stages["generate"].resources.cpus == 1
    assert config.default_run_dir() == "runs/dag"


def test_overrides_apply_before_validation(tmp_path):
    path = write_config(tmp_path / "ok.yaml", smoke_config())
    config = load_config(path, ["transform.factor=9", "seed=1", "ray.num_cpus=1"])
    assert config.stages["transform"].params["factor"] == 9
    assert config.seed == 1 and config.ray.num_cpus == 1
    with pytest.raises(ConfigError, match=r"stages\.transform\.params\.factor: Input should be a valid integer"):
        load_config(path, ["transform.factor=nine"])


def _mutate(fn):
    raw = copy.deepcopy(smoke_config())
    fn(raw)
    return raw


BAD_CONFIGS = {
    "unknown top-level key": (lambda c: c.update(bogus=1), r"bogus: unknown field \(expected one of: .*stages"),
    "wrong type": (lambda c: c.update(seed="abc"), r"seed: Input should be a valid integer, got 'abc'"),
    "missing required field": (lambda c: c.pop("stages"), r"stages: required field is missing"),
    "unknown stage type": (lambda c: c["stages"]["generate"].update(type="nope"),
                           r"stages\.generate\.type: unknown stage type 'nope' \(registered: .*smoke\.generate"),
    "input names a missing stage": (lambda c: c["stages"]["transform"].update(inputs={"source": "ghost"}),
                                    r"stages\.transform\.inputs\.source: names stage 'ghost', which does not exist"),
    "cycle": (lambda c: c["stages"]["generate"].update(type="smoke.combine", inputs=["combine"], params={}),
              r"stages: the inputs form a cycle: .*generate.*transform.*combine"),
    "impossible value": (lambda c: c["stages"]["generate"]["params"].update(records=0),
                         r"stages\.generate\.params\.records: Input should be greater than or equal to 1"),
    "unknown param": (lambda c: c["stages"]["generate"]["params"].update(recordz=5),
                      r"stages\.generate\.params\.recordz: unknown field \(expected one of: records, steps, work_s\)"),
    "missing input role": (lambda c: c["stages"]["transform"].pop("inputs"),
                           r"stages\.transform\.inputs: stage type 'smoke.transform' needs input role\(s\) source"),
    "unexpected input role": (lambda c: c["stages"]["generate"].update(inputs={"x": "combine"}),
                              r"stages\.generate\.inputs\.x: unexpected input role"),
    "negative resources": (lambda c: c["stages"]["generate"].update(resources={"cpus": -1}),
                           r"stages\.generate\.resources\.cpus: Input should be greater than or equal to 0"),
    "bad run name": (lambda c: c.update(name="a b"), r"name: String should match pattern"),
    "nested unknown key": (lambda c: c.update(ray={"adress": "x"}), r"ray\.adress: unknown field \(expected one of: address"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_bad_configs_give_one_line_naming_file_and_field(tmp_path, kind):
    mutate, pattern = BAD_CONFIGS[kind]
    path = write_config(tmp_path / "bad.yaml", _mutate(mutate))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert __import__("re").search(pattern, message), message


def test_yaml_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nstages: {a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML: line \d+, column \d+"):
        load_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="config file is empty"):
        load_config(empty)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(listy)


def test_unknown_plugin_module_is_a_config_error():
    raw = smoke_config()
    raw["plugins"] = ["no_such_vitpipe_plugin"]
    with pytest.raises(ConfigError, match="plugins: cannot import module 'no_such_vitpipe_plugin'"):
        parse_config(raw, source="x.yaml")


def test_cli_validate_exit_codes_and_single_line_errors(tmp_path, capsys):
    from pipeline.cli import main

    good = write_config(tmp_path / "good.yaml", smoke_config())
    ok = run_cli("validate", str(good))  # the real command, in its own process
    assert ok.returncode == 0, ok.stderr
    assert "ok (3 stages" in ok.stdout
    for kind in ("wrong type", "cycle", "unknown stage type", "impossible value", "input names a missing stage",
                 "unknown top-level key"):
        mutate, _ = BAD_CONFIGS[kind]
        path = write_config(tmp_path / f"{kind.replace(' ', '_')}.yaml", _mutate(mutate))
        if kind == "cycle":  # one in its own process: the exit status and stderr a shell sees
            result = run_cli("validate", str(path))
            code, stderr = result.returncode, result.stderr
        else:  # the rest through the same entry point, in this process (each subprocess costs ~3 s)
            code, stderr = main(["validate", str(path)]), capsys.readouterr().err
        assert code == 2, kind
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vitpipe: error: {path}: "), (kind, stderr)
    assert main(["validate", "configs/smoke.yaml"]) == 0
