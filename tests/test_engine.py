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
from pipeline.storage import LocalStorage, open_storage
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


def test_a_run_whose_manifests_an_older_vitpipe_formatted_stays_up_to_date(tmp_path):
    """Manifests were indented JSON and downstream stages recorded the digest of that text; compact
    manifests must not make every such run re-run (digests come from the text on storage)."""
    import hashlib

    uri = str(tmp_path / "run")
    assert run_pipeline(parse_config(smoke_config()), uri, RayExecutor()).ok
    stages = tmp_path / "run/stages"
    digests = {}
    for name in ("generate", "transform", "combine"):  # in order: inputs first, as the old format had them
        manifest = json.loads((stages / name / "manifest.json").read_text())
        for record in manifest["inputs"].values():
            record["manifest_sha256"] = digests[record["stage"]]
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (stages / name / "manifest.json").write_text(text)
        digests[name] = hashlib.sha256(text.encode()).hexdigest()
    assert run_pipeline(parse_config(smoke_config()), uri, RayExecutor()).ran == []
    # A stage re-run now consumes an old-format input: it records that input's stored digest.
    (stages / "combine/manifest.json").unlink()
    assert run_pipeline(parse_config(smoke_config()), uri, RayExecutor()).ran == ["combine"]
    recorded = json.loads((stages / "combine/manifest.json").read_text())["inputs"]
    assert recorded and all(r["manifest_sha256"] == digests[r["stage"]] for r in recorded.values()), recorded
    assert run_pipeline(parse_config(smoke_config()), uri, RayExecutor()).ran == []


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
    assert f"transform: set aside by re-runs, kept in {aside} (config changed (factor), " in table


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


class _KilledAt(LocalStorage):
    """A disk on which the driver process dies (KeyboardInterrupt) partway through one step of a
    set-aside: after copying one file, or after removing one original."""

    def __init__(self, root: Path, step: str) -> None:
        super().__init__(root)
        self.step = step

    def copy_prefix(self, prefix: str, target: str) -> int:
        if self.step == "copy":
            first = self.list(prefix)[0]
            self.write_bytes(target + first.path[len(prefix):], self.read_bytes(first.path))
            raise KeyboardInterrupt("killed while copying")
        return super().copy_prefix(prefix, target)

    def delete_prefix(self, prefix: str = "") -> int:
        if self.step == "remove" and prefix == "stages/transform":
            self.delete(self.list(prefix)[0].path)
            raise KeyboardInterrupt("killed while removing the originals")
        return super().delete_prefix(prefix)


def _driver(root: Path, step: str = ""):
    from pipeline.engine import _Driver
    from pipeline.lock import RunLock

    storage = _KilledAt(root, step)
    return _Driver(parse_config(smoke_config()), storage, executor=None, show_progress=False, lock=RunLock(storage))


def _tree(store, prefix: str) -> dict[str, bytes]:
    return {o.path[len(prefix) + 1:]: store.read_bytes(o.path) for o in store.list(prefix)}


FINISHED = {"manifest.json": b"{}", "numbers.txt": b"1 2 3", "checkpoints/step-1/rank0.pt": b"weights"}


def test_a_driver_killed_while_setting_a_folder_aside_loses_nothing(tmp_path):
    from pipeline.engine import StagePlan

    root, plan = tmp_path / "run", StagePlan("transform", "run", "config changed (factor)", "new")
    store = LocalStorage(root)
    for rel, data in FINISHED.items():
        store.write_bytes(f"stages/transform/{rel}", data)

    # 1. Killed while copying: the next driver (reading state.json afresh) leaves the originals
    #    where they are — the stage may still resume from them.
    killed = _driver(root, "copy")
    killed.state.stage("transform").fingerprint = "old"
    with pytest.raises(KeyboardInterrupt):
        killed._set_aside(plan, killed.state.stage("transform"))
    successor = _driver(root)
    st = successor.state.stage("transform")
    assert st.setting_aside is not None  # recorded before anything moved
    successor._settle_set_aside("transform", st)
    assert _tree(store, "stages/transform") == FINISHED and (st.setting_aside, st.fingerprint) == (None, "old")
    successor._save()

    # 2. Killed while removing the originals after the copy was complete: the next driver only
    #    finishes the removal; the copy is whole, and nothing is left to resume from.
    killed = _driver(root, "remove")
    with pytest.raises(KeyboardInterrupt):
        killed._set_aside(plan, killed.state.stage("transform"))
    assert store.list("stages/transform")  # some originals are still there
    successor = _driver(root)
    st = successor.state.stage("transform")
    successor._settle_set_aside("transform", st)
    assert _tree(store, "stages/transform.previous") == {**FINISHED, "SET_ASIDE.json": ANY_BYTES}
    assert store.list("stages/transform") == [] and (st.setting_aside, st.fingerprint) == (None, None)


def test_a_failed_attempt_never_pushes_out_the_last_finished_result(tmp_path):
    from pipeline.engine import StagePlan

    root = tmp_path / "run"
    store, driver = LocalStorage(root), _driver(tmp_path / "run")
    st = driver.state.stage("transform")
    for rel, data in FINISHED.items():
        store.write_bytes(f"stages/transform/{rel}", data)
    driver._set_aside(StagePlan("transform", "run", "config changed (factor)", "y"), st)
    # An attempt under another config fails (no manifest), then the config changes again.
    store.write_bytes("stages/transform/error.txt", b"Traceback ...")
    store.write_bytes("stages/transform/checkpoints/step-1/rank0.pt", b"other weights")
    driver._set_aside(StagePlan("transform", "run", "config changed (factor)", "z"), st)
    assert _tree(store, "stages/transform.previous") == {**FINISHED, "SET_ASIDE.json": ANY_BYTES}
    assert _tree(store, "stages/transform.partial") == {
        "error.txt": b"Traceback ...", "checkpoints/step-1/rank0.pt": b"other weights", "SET_ASIDE.json": ANY_BYTES}
    assert store.list("stages/transform") == []


class _AnyBytes(bytes):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, bytes)

    __hash__ = bytes.__hash__


ANY_BYTES = _AnyBytes()


def test_a_failed_ray_task_inside_a_stage_is_reported_as_what_it_raised_not_its_traceback():
    import ray

    from pipeline.errors import StorageError
    from pipeline.runner import _one_line

    @ray.remote
    def write_shard() -> None:
        raise StorageError("s3://b/run/shard.tar: cannot reach http://127.0.0.1:1; check AWS_ENDPOINT_URL")

    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(write_shard.remote())
    assert _one_line(err.value) == "s3://b/run/shard.tar: cannot reach http://127.0.0.1:1; check AWS_ENDPOINT_URL"


def test_working_files_are_removed_after_the_commit_and_a_failure_to_is_only_logged(tmp_path, caplog):
    """A stage's working folders (ingest's saved listing) go once its manifest is committed; if
    they cannot be removed, the committed stage stands and the log names what is left."""
    from pipeline.runner import _remove_working_dirs

    out = LocalStorage(tmp_path / "stage")
    out.write_text("listing/parts.json", "{}")
    out.write_text("listing/parts-0000000-0000003.parquet", "x")
    out.write_text("shards/train-000000.tar", "kept")
    _remove_working_dirs(out, ("listing",))
    assert [o.path for o in out.list()] == ["shards/train-000000.tar"]

    class Stuck(LocalStorage):
        def delete_prefix(self, prefix=""):
            raise OSError("permission denied")

    stuck = Stuck(tmp_path / "stage")
    stuck.write_text("listing/parts.json", "{}")
    _remove_working_dirs(stuck, ("listing",))
    assert "could not remove the stage's working files (OSError: permission denied); they are safe to delete" \
        in caplog.text
