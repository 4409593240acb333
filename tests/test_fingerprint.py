from pipeline.config import parse_config
from pipeline.fingerprint import canonical_json, stage_fingerprints
from tests.conftest import REPO, smoke_config


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


def test_execution_params_name_real_fields_of_every_stage_type():
    from pipeline.registry import find_stage, load_plugins, stage_types

    load_plugins()
    for type_name in stage_types():
        params_model = find_stage(type_name).Params
        assert params_model.execution_params <= set(params_model.model_fields), type_name


def test_execution_params_stay_out_of_the_fingerprint():
    base = stage_fingerprints(parse_config(smoke_config()))
    raw = smoke_config()
    raw["stages"]["combine"]["params"] = {"work_s": 0.5}  # how long it takes, not what it makes
    assert stage_fingerprints(parse_config(raw)) == base


def _tiny(**pretrain: object) -> dict[str, str]:
    from pipeline.config import load_config

    overrides = [f"stages.pretrain.params.{k}={v}" for k, v in pretrain.items()]
    return stage_fingerprints(load_config(str(REPO / "configs/tiny.yaml"), overrides))


def test_training_runs_resume_through_execution_changes_but_not_through_result_changes():
    base = _tiny()
    for change in ({"max_failures": 9}, {"loader_workers": 2}, {"log_every": 7}, {"checkpoint_every": 50},
                   {"keep_checkpoints": 5}, {"micro_batch": 16}, {"tensorboard": False}, {"ledger": True},
                   {"workers": 1, "micro_batch": 64}):  # streams is pinned in tiny.yaml: the order stays
        assert _tiny(**change)["pretrain"] == base["pretrain"], change
    for change in ({"lr": 0.002}, {"steps": 601}, {"global_batch": 128}, {"streams": 4}, {"zero_stage": 3},
                   {"precision": "bf16"}):
        changed = _tiny(**change)
        assert changed["pretrain"] != base["pretrain"] and changed["finetune"] != base["finetune"], change
        assert changed["ingest"] == base["ingest"]


def test_unset_streams_follow_the_workers_so_the_workers_then_decide_the_order():
    a = _tiny(streams="null", workers=2)
    b = _tiny(streams="null", workers=1, micro_batch=64)
    assert a["pretrain"] != b["pretrain"]
