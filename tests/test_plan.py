"""plan_run is pure: these tests feed it manifests directly."""

import pytest

from pipeline.config import load_config, parse_config
from pipeline.engine import plan_run
from pipeline.errors import ConfigError
from pipeline.fingerprint import accepted_fingerprints, stage_fingerprints
from pipeline.manifest import InputRecord, Manifest, manifest_digest
from tests.conftest import REPO, smoke_config


def _manifests(config, fps, names=None):
    """Manifests as a completed run would have committed them."""
    out = {}
    for name, spec in config.stages.items():
        if names is not None and name not in names:
            out[name] = None
            continue
        inputs = {role: InputRecord(stage=up, fingerprint=fps[up], manifest_sha256=manifest_digest(out[up]))
                  for role, up in spec.inputs.items()}
        out[name] = Manifest(stage=name, type=spec.type, fingerprint=fps[name], params=spec.params, inputs=inputs)
    return out


def _actions(plans):
    return {p.name: p.action for p in plans}


def test_fresh_run_runs_everything():
    config = parse_config(smoke_config())
    fps = stage_fingerprints(config)
    plans = plan_run(config, fps, {n: None for n in config.stages})
    assert [p.name for p in plans] == ["generate", "transform", "combine"]
    assert all(p.action == "run" and p.reason == "not run yet" for p in plans)


def test_complete_run_skips_everything():
    config = parse_config(smoke_config())
    fps = stage_fingerprints(config)
    assert set(_actions(plan_run(config, fps, _manifests(config, fps))).values()) == {"skip"}


def test_interrupted_run_resumes_at_the_first_missing_stage():
    config = parse_config(smoke_config())
    fps = stage_fingerprints(config)
    plans = plan_run(config, fps, _manifests(config, fps, names={"generate"}))
    assert _actions(plans) == {"generate": "skip", "transform": "run", "combine": "run"}


def test_config_change_reruns_that_stage_and_downstream():
    old = parse_config(smoke_config())
    manifests = _manifests(old, stage_fingerprints(old))
    new = parse_config(smoke_config(factor=5))
    plans = plan_run(new, stage_fingerprints(new), manifests)
    assert _actions(plans) == {"generate": "skip", "transform": "run", "combine": "run"}
    assert plans[1].reason == "config changed (factor)"  # names the result-defining params that differ


def test_rerun_upstream_with_same_fingerprint_invalidates_consumers():
    config = parse_config(smoke_config())
    fps = stage_fingerprints(config)
    manifests = _manifests(config, fps)
    # transform was re-run (same config, new outputs): combine consumed the old manifest.
    manifests["transform"] = manifests["transform"].model_copy(update={"metrics": {"rerun": True}})
    plans = plan_run(config, fps, manifests)
    assert _actions(plans) == {"generate": "skip", "transform": "skip", "combine": "run"}
    assert plans[2].reason == "input 'transform' changed"


def test_from_forces_downstream_and_only_runs_exactly_the_selection():
    config = parse_config(smoke_config())
    fps = stage_fingerprints(config)
    manifests = _manifests(config, fps)
    assert _actions(plan_run(config, fps, manifests, from_stages=["transform"])) == {
        "generate": "skip", "transform": "run", "combine": "run"}
    assert _actions(plan_run(config, fps, manifests, only=["transform"])) == {
        "generate": "leave", "transform": "run", "combine": "leave"}


def test_only_refuses_when_inputs_are_incomplete_and_unknown_names_are_errors():
    config = parse_config(smoke_config())
    fps = stage_fingerprints(config)
    with pytest.raises(ConfigError, match="--only transform: its input stage 'generate' is not complete"):
        plan_run(config, fps, {n: None for n in config.stages}, only=["transform"])
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        plan_run(config, fps, {n: None for n in config.stages}, from_stages=["nope"])


def test_damaged_outputs_rerun_the_stage():
    config = parse_config(smoke_config())
    fps = stage_fingerprints(config)
    plans = plan_run(config, fps, _manifests(config, fps), broken={"generate": "numbers.txt: missing"})
    assert _actions(plans) == {"generate": "run", "transform": "run", "combine": "run"}
    assert plans[0].reason == "outputs damaged: numbers.txt: missing"


def test_manifests_of_older_versions_that_hashed_every_param_are_up_to_date():
    config = load_config(REPO / "configs/tiny.yaml")
    older = stage_fingerprints(config, all_params=True)  # execution params included, as before
    assert older["pretrain"] != stage_fingerprints(config)["pretrain"]
    manifests = _manifests(config, older)
    plans = plan_run(config, stage_fingerprints(config), manifests, accepted=accepted_fingerprints(config))
    assert set(_actions(plans).values()) == {"skip"}
    # ...and stay so when only an execution param changes now (recomputed from what they recorded,
    # their fingerprints show the same seed),
    changed = load_config(REPO / "configs/tiny.yaml", ["pretrain.max_failures=9", "ingest.workers=1"])
    plans = plan_run(changed, stage_fingerprints(changed), manifests, accepted=accepted_fingerprints(changed))
    assert set(_actions(plans).values()) == {"skip"}
    # ...but not when the seed changed.
    reseeded = load_config(REPO / "configs/tiny.yaml", ["seed=1"])
    plans = plan_run(reseeded, stage_fingerprints(reseeded), manifests, accepted=accepted_fingerprints(reseeded))
    assert {p.name: p.reason for p in plans}["ingest"] == "config changed (the seed)"


def test_an_input_removed_from_a_stage_re_runs_it_even_when_its_params_are_unchanged():
    raw = smoke_config()
    raw["stages"]["combine"]["inputs"] = ["transform", "generate"]
    old = parse_config(raw)
    manifests = _manifests(old, stage_fingerprints(old))
    new = parse_config(smoke_config())  # combine reads transform only now
    plans = plan_run(new, stage_fingerprints(new), manifests, accepted=accepted_fingerprints(new))
    assert {p.name: (p.action, p.reason) for p in plans}["combine"] == ("run", "inputs changed (generate)")


def test_a_manifest_matches_only_while_the_manifests_it_consumed_match_too():
    from pipeline.engine import matching_manifests

    old = parse_config(smoke_config())
    manifests = _manifests(old, stage_fingerprints(old))
    assert matching_manifests(old, accepted_fingerprints(old), manifests) == {"generate", "transform", "combine"}
    raw = smoke_config()
    raw["stages"]["generate"]["params"]["records"] = 10  # transform's and combine's own configs are unchanged
    new = parse_config(raw)
    assert matching_manifests(new, accepted_fingerprints(new), manifests) == set()
    # Older manifests (every param hashed) of a whole chain still match:
    tiny = load_config(REPO / "configs/tiny.yaml")
    older = _manifests(tiny, stage_fingerprints(tiny, all_params=True))
    now = load_config(REPO / "configs/tiny.yaml", ["pretrain.max_failures=9", "ingest.workers=1"])
    assert matching_manifests(now, accepted_fingerprints(now), older) == set(now.stages)
    reseeded = load_config(REPO / "configs/tiny.yaml", ["seed=1"])
    assert matching_manifests(reseeded, accepted_fingerprints(reseeded), older) == set()
