from pipeline.config import parse_config
from pipeline.fingerprint import canonical_json, stage_fingerprints
from tests.conftest import smoke_config


def test_canonical_json_ignores_key_order():
    assert canonical_json({"b": 1, "a": [1, {"y": 2, "x": 1}]}) == canonical_json({"a": [1, {"x": 1, "y": 2}], "b": 1})


def test_a_param_change_changes_that_stage_and_everything_downstream_only():
    base = stage_fingerprints(parse_config(smoke_config()))
    changed = stage_fingerprints(parse_config(smoke_config(factor=5)))
    assert base["generate"] == changed["generate"]
    assert base["transform"] != changed["transform"]
    assert base["combine"] != changed["combine"]


def test_defaults_are_part_of_the_fingerprint_so_spelling_them_out_changes_nothing():
    implicit = smoke_config()
    explicit = smoke_config()
    explicit["stages"]["combine"]["params"] = {"work_s": 0.0}
    assert stage_fingerprints(parse_config(implicit)) == stage_fingerprints(parse_config(explicit))


def test_seed_changes_every_fingerprint():
    a = parse_config(smoke_config())
    raw = smoke_config()
    raw["seed"] = 8
    b = parse_config(raw)
    fa, fb = stage_fingerprints(a), stage_fingerprints(b)
    assert all(fa[k] != fb[k] for k in fa)
