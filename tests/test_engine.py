"""The engine end to end on a real (embedded) Ray instance, run in-process."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from cluster.executor import RayExecutor
from pipeline.config import parse_config
from pipeline.engine import run_pipeline
from pipeline.errors import StageFailedError
from pipeline.events import read_events
from pipeline.manifest import read_manifest
from pipeline.state import load_state
from pipeline.status import collect_status, format_table
from pipeline.storage import open_storage
from tests.conftest import smoke_config

pytestmark = pytest.mark.usefixtures("ray_instance")


def _outputs(root: Path) -> dict[str, bytes]:
    """Every stage's outputs (not what re-runs set aside)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and not p.relative_to(root).parts[0].endswith(".previous")}


def _started(uri: str) -> dict[str, str]:
    """When each stage's committed manifest says it started."""
    store = open_storage(uri)
    return {name: read_manifest(store.child(f"stages/{name}")).timings["started"]
            for name in ("generate", "transform", "combine")}


def test_run_then_rerun_skips_then_config_change_reruns_downstream_only(tmp_path):
    uri = str(tmp_path / "run")
    config = parse_config(smoke_config())
    summary = run_pipeline(config, uri, RayExecutor())
    assert summary.ran == ["generate", "transform", "combine"] and summary.ok
    first = _started(uri)
    # Outputs are the deterministic function of the config the smoke stages promise.
    numbers = [int(x) for x in (tmp_path / "run/stages/generate/numbers.txt").read_text().split()]
    scaled = [int(x) for x in (tmp_path / "run/stages/transform/numbers.txt").read_text().split()]
    assert len(numbers) == 5000 and scaled == [3 * x for x in numbers]
    summary_json = json.loads((tmp_path / "run/stages/combine/summary.json").read_text())
    assert summary_json["transform"]["sum"] == sum(scaled)

    again = run_pipeline(parse_config(smoke_config()), uri, RayExecutor())
    assert again.ran == [] and again.skipped == ["generate", "transform", "combine"]
    assert _started(uri) == first

    changed = run_pipeline(parse_config(smoke_config(factor=5)), uri, RayExecutor())
    assert changed.ran == ["transform", "combine"] and changed.skipped == ["generate"]
    after = _started(uri)
    assert after["generate"] == first["generate"]
    assert after["transform"] > first["transform"] and after["combine"] > first["combine"]
    rescaled = [int(x) for x in (tmp_path / "run/stages/transform/numbers.txt").read_text().split()]
    assert rescaled == [5 * x for x in numbers]
    # What the re-run replaced is kept aside, not deleted (one generation), with why.
    aside = tmp_path / "run/stages/transform.previous"
    assert [int(x) for x in (aside / "numbers.txt").read_text().split()] == scaled
    marker = json.loads((aside / "SET_ASIDE.json").read_text())
    assert (marker["reason"], marker["status"], marker["objects"]) == ("config changed (factor)", "done", 2)
    assert json.loads((tmp_path / "run/stages/combine.previous/SET_ASIDE.json").read_text())["reason"] == \
        "input 'transform' re-runs"
    assert not (tmp_path / "run/stages/generate.previous").exists()

    # An execution param (how long combine takes) is not a config change: nothing re-runs.
    raw = smoke_config(factor=5)
    raw["stages"]["combine"]["params"] = {"work_s": 0.01}
    assert run_pipeline(parse_config(raw), uri, RayExecutor()).ran == []

    events = [e for e in read_events(open_storage(uri))]
    names = [e["event"] for e in events]
    assert names.count("run_started") == 4 and names.count("stage_finished") == 5
    assert [(e["stage"], e["to"]) for e in events if e["event"] == "stage_set_aside"] == [
        ("transform", "stages/transform.previous"), ("combine", "stages/combine.previous")]
    _, rows = collect_status(open_storage(uri))
    assert [(r.stage, r.state) for r in rows] == [("generate", "done"), ("transform", "done"), ("combine", "done")]
    table = format_table(rows)
    assert table.splitlines()[0].split() == ["STAGE", "TYPE", "STATE", "DURATION", "OUTPUTS", "ERROR"]
    assert f"transform: outputs from before it re-ran are kept in {aside} (config changed (factor), " in table


def test_manifest_names_every_output_with_checksums_and_inputs(tmp_path):
    uri = str(tmp_path / "run")
    run_pipeline(parse_config(smoke_config()), uri, RayExecutor())
    store = open_storage(uri)
    gen = read_manifest(store.child("stages/generate"))
    tr = read_manifest(store.child("stages/transform"))
    assert [o.path for o in gen.outputs] == ["numbers.txt"]
    import hashlib

    data = (tmp_path / "run/stages/generate/numbers.txt").read_bytes()
    assert gen.outputs[0].sha256 == hashlib.sha256(data).hexdigest() and gen.outputs[0].size == len(data)
    assert tr.inputs["source"].stage == "generate" and tr.inputs["source"].fingerprint == gen.fingerprint
    assert {"python", "ray", "vitpipe"} <= set(gen.versions)
    assert gen.timings["duration_s"] >= 0 and gen.params["records"] == 5000


def test_deleted_output_is_detected_and_the_stage_reruns(tmp_path):
    uri = str(tmp_path / "run")
    run_pipeline(parse_config(smoke_config()), uri, RayExecutor())
    before = _outputs(tmp_path / "run/stages")
    (tmp_path / "run/stages/transform/numbers.txt").unlink()
    summary = run_pipeline(parse_config(smoke_config()), uri, RayExecutor())
    assert summary.ran == ["transform", "combine"]
    assert _outputs(tmp_path / "run/stages") == before
    aside = json.loads((tmp_path / "run/stages/transform.previous/SET_ASIDE.json").read_text())
    assert (aside["reason"], aside["objects"]) == ("outputs damaged: numbers.txt: missing", 1)  # its manifest


def test_failure_blocks_downstream_runs_independent_branches_and_reports_one_line(tmp_path):
    raw = smoke_config()
    raw["stages"]["transform"]["type"] = "smoke.transform"
    raw["stages"]["other"] = {"type": "smoke.transform", "inputs": {"source": "generate"}}
    raw["plugins"] = ["tests.failing_stage"]
    raw["stages"]["boom"] = {"type": "test.fail", "inputs": {"source": "generate"},
                             "params": {"message": "disk quota exceeded"}}
    raw["stages"]["combine"]["inputs"] = ["transform", "boom"]
    uri = str(tmp_path / "run")
    with pytest.raises(StageFailedError, match="stage 'boom' failed: OSError: disk quota exceeded"):
        run_pipeline(parse_config(raw), uri, RayExecutor())
    state = load_state(open_storage(uri), "dag")
    assert state.stages["boom"].status == "failed"
    assert state.stages["boom"].error == "OSError: disk quota exceeded"
    assert state.stages["combine"].status == "blocked"
    assert state.stages["other"].status == "done" and state.stages["transform"].status == "done"
    traceback_text = (tmp_path / "run/stages/boom/error.txt").read_text()
    assert "Traceback" in traceback_text and "disk quota exceeded" in traceback_text
    _, rows = collect_status(open_storage(uri))
    by_stage = {r.stage: r for r in rows}
    assert by_stage["boom"].state == "failed" and by_stage["boom"].error == "OSError: disk quota exceeded"


def test_independent_stages_run_concurrently(tmp_path):
    raw = smoke_config()
    raw["stages"]["transform"]["params"]["work_s"] = 2.0
    raw["stages"]["twin"] = {"type": "smoke.transform", "inputs": {"source": "generate"},
                             "params": {"factor": 2, "work_s": 2.0}}
    raw["stages"]["combine"]["inputs"] = ["transform", "twin"]
    uri = str(tmp_path / "run")
    run_pipeline(parse_config(raw), uri, RayExecutor())
    store = open_storage(uri)
    spans = {}
    for name in ("transform", "twin"):
        t = read_manifest(store.child(f"stages/{name}")).timings
        spans[name] = (datetime.fromisoformat(t["started"]), datetime.fromisoformat(t["finished"]))
    (a0, a1), (b0, b1) = spans["transform"], spans["twin"]
    assert a0 < b1 and b0 < a1, f"stages did not overlap: {spans}"


def test_same_dag_on_s3(s3_endpoint, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/dag"
    summary = run_pipeline(parse_config(smoke_config(endpoint=s3_endpoint)), uri, RayExecutor())
    assert summary.ran == ["generate", "transform", "combine"]
    store = open_storage(uri, parse_config(smoke_config(endpoint=s3_endpoint)).storage)
    keys = [o.path for o in store.list()]
    assert "config.json" in keys and "events.jsonl" in keys and "stages/combine/manifest.json" in keys
    assert ".lock.json" not in keys  # released
    again = run_pipeline(parse_config(smoke_config(endpoint=s3_endpoint)), uri, RayExecutor())
    assert again.ran == []
    changed = run_pipeline(parse_config(smoke_config(factor=5, endpoint=s3_endpoint)), uri, RayExecutor())
    assert changed.ran == ["transform", "combine"]


def _driver_with_stage_outputs(tmp_path, files: dict[str, bytes]):
    from pipeline.engine import _Driver

    store = open_storage(str(tmp_path / "run"))
    for rel, data in files.items():
        store.write_bytes(f"stages/transform/{rel}", data)
    driver = _Driver(parse_config(smoke_config()), store, executor=None, show_progress=False)
    return driver, store


def _tree(store, prefix: str) -> dict[str, bytes]:
    return {o.path[len(prefix) + 1:]: store.read_bytes(o.path) for o in store.list(prefix)}


def test_a_set_aside_cut_short_is_settled_by_the_next_driver_without_losing_a_file(tmp_path):
    from pipeline.engine import StagePlan

    files = {"manifest.json": b"{}", "numbers.txt": b"1 2 3", "checkpoints/step-1/rank0.pt": b"weights"}
    driver, store = _driver_with_stage_outputs(tmp_path, files)
    st = driver.state.stage("transform")

    # 1. Died while copying: a token in the state, part of a copy and no marker. The originals
    #    were never touched: they stay, and the stage may resume from them.
    st.setting_aside, st.fingerprint = "t1", "old"
    store.write_bytes("stages/transform.previous/numbers.txt", b"1 2 3")
    driver._settle_set_aside("transform", st)
    assert _tree(store, "stages/transform") == files and (st.setting_aside, st.fingerprint) == (None, "old")

    # 2. A re-run sets them aside, replacing whatever was there, the commit record included.
    driver._set_aside(StagePlan("transform", "run", "config changed (factor)", "new"), st)
    assert _tree(store, "stages/transform.previous") == {**files, "SET_ASIDE.json": ANY_BYTES}
    assert store.list("stages/transform") == [] and st.setting_aside is None

    # 3. Died removing the originals after the copy was complete: only the removal is finished,
    #    and nothing is left to resume from.
    store.write_bytes("stages/transform/numbers.txt", b"1 2 3")
    st.setting_aside = json.loads(store.read_text("stages/transform.previous/SET_ASIDE.json"))["token"]
    driver._settle_set_aside("transform", st)
    assert _tree(store, "stages/transform.previous") == {**files, "SET_ASIDE.json": ANY_BYTES}
    assert store.list("stages/transform") == [] and (st.setting_aside, st.fingerprint) == (None, None)


class _AnyBytes(bytes):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, bytes)

    __hash__ = bytes.__hash__


ANY_BYTES = _AnyBytes()
