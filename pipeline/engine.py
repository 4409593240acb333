"""The engine: decides which stages to run, runs them through an executor, records everything.

Planning (:func:`plan_run`) is a pure function of the config, the fingerprints and the committed
manifests. A stage is skipped iff its manifest exists, its fingerprint matches, and each input's
manifest is the one it consumed (and that input is not itself re-running). Everything else runs,
and so does everything downstream of it.

Execution goes through an :class:`Executor` (Ray tasks in :mod:`cluster.executor`); independent
stages are submitted together and run concurrently as far as the cluster's resources allow.
Before a stage runs, its old manifest is removed, so a crash mid-stage can never leave an old
manifest describing new, half-written outputs. The stage folder itself is kept when the same
fingerprint is being retried (so a stage can resume from its own checkpoints; execution params
such as worker counts are not part of the fingerprint). When the result-defining config changed
or ``--from`` forces a re-run, the folder's outputs and checkpoints are never deleted: they are
moved to ``stages/NAME.previous/`` (a finished result) or ``stages/NAME.partial/`` (an
unfinished attempt), one of each kept, and the run's events say so.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

from pipeline import dag, registry
from pipeline.config import RunConfig, StageResources, StageSpec
from pipeline.errors import ConfigError, RunLockLostError, StageFailedError, VitpipeError
from pipeline.events import EventLog
from pipeline.fingerprint import accepted_fingerprints, result_params, stage_fingerprint, stage_fingerprints
from pipeline.lock import RunLock, acquire_run_lock
from pipeline.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestHead,
    manifest_digest,
    read_manifest,
    verify_outputs,
)
from pipeline.preflight import infeasible_reason, task_demand
from pipeline.runner import StageResult, StageTask, stage_folder
from pipeline.state import RunState, StageState, load_state, save_state
from pipeline.storage import Storage, open_storage
from pipeline.trackers import TrackerIds, TrackerWriter, finish_tracking, start_tracking

__all__ = ["CONFIG_FILE", "PREVIOUS_SUFFIX", "PARTIAL_SUFFIX", "SET_ASIDE_FILE", "StagePlan", "plan_run",
           "matching_manifests", "Executor", "RunSummary", "run_pipeline", "read_run_config"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TRACKING_FILE = "tracking.json"  # which MLflow / W&B runs the run writes to (credentials masked)
PREVIOUS_SUFFIX = ".previous"  # stages/NAME.previous/: a stage's last finished outputs before it re-ran
PARTIAL_SUFFIX = ".partial"  # stages/NAME.partial/: the files of its last unfinished attempt under another config
SET_ASIDE_FILE = "SET_ASIDE.json"  # written into it once every object is there


@dataclass(frozen=True)
class StagePlan:
    name: str
    action: Literal["run", "skip", "leave"]
    reason: str
    fingerprint: str


def _changed_params(type_name: str, params: Mapping[str, Any], manifest: Manifest) -> list[str]:
    """The result-defining params that differ from those a committed stage ran with, by name."""
    try:
        old = result_params(manifest.type, manifest.params)
    except ValueError:  # recorded by a version whose params no longer validate (pydantic's errors are ValueErrors)
        return ["params of an older version"]
    new = result_params(type_name, params)
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))


def _config_difference(spec: StageSpec, manifest: ManifestHead) -> str | None:
    """How a stage's config differs from the one its committed manifest was made with (None: the
    type, the input roles and the result params are the same)."""
    if manifest.type != spec.type:
        return f"stage type changed ({manifest.type} -> {spec.type})"
    if set(manifest.inputs) != set(spec.inputs):
        return f"inputs changed ({', '.join(sorted(set(manifest.inputs) ^ set(spec.inputs)))})"
    changed = _changed_params(spec.type, spec.params, manifest)
    return f"config changed ({', '.join(changed)})" if changed else None


def _older_fingerprint_holds(manifest: ManifestHead, seed: int) -> bool:
    """Whether a manifest from before execution params left the fingerprint (it hashed every
    param) was made with this seed: its fingerprint recomputed from what it recorded matches."""
    inputs = {role: record.fingerprint for role, record in manifest.inputs.items()}
    return manifest.fingerprint == stage_fingerprint(manifest.type, manifest.params, seed, inputs)


def matching_manifests(config: RunConfig, accepted: Mapping[str, Collection[str]],
                       manifests: Mapping[str, ManifestHead | None]) -> set[str]:
    """The stages whose committed manifest was made with this config, their inputs' included.

    ``accepted``: per stage, the fingerprints that mean its current config (a fingerprint covers
    the inputs' fingerprints too). A manifest whose fingerprint is not among them — one from a
    version that hashed every param — is judged by what it recorded: the same type, input roles,
    result params and seed, and inputs that are the upstream manifests now there and match too.
    """
    graph = {name: list(spec.inputs.values()) for name, spec in config.stages.items()}
    matched: set[str] = set()
    for name in dag.topological_order(graph):
        spec, manifest = config.stages[name], manifests.get(name)
        if manifest is None:
            continue
        if manifest.fingerprint in accepted[name] or (
                _config_difference(spec, manifest) is None and _older_fingerprint_holds(manifest, config.seed)
                and all(upstream in matched and manifest.inputs[role].fingerprint == manifests[upstream].fingerprint
                        for role, upstream in spec.inputs.items())):
            matched.add(name)
    return matched


def plan_run(
    config: RunConfig,
    fingerprints: Mapping[str, str],
    manifests: Mapping[str, Manifest | None],
    only: Collection[str] = (),
    from_stages: Collection[str] = (),
    broken: Mapping[str, str] | None = None,
    accepted: Mapping[str, Collection[str]] | None = None,
) -> list[StagePlan]:
    """Decide, in topological order, which stages run and why.

    ``only``: run exactly these stages (their inputs must be complete); leave the rest.
    ``from_stages``: force these stages and everything downstream of them to run.
    ``broken``: stages whose committed outputs failed verification, with the reason.
    ``accepted``: per stage, other fingerprints that mean the same config (an older version's).
    """
    graph = {name: list(spec.inputs.values()) for name, spec in config.stages.items()}
    for name in (*only, *from_stages):
        if name not in config.stages:
            raise ConfigError(f"no stage named {name!r} (stages: {', '.join(config.stages)})")
    forced = dag.downstream_closure(graph, from_stages) if from_stages else set()
    broken = broken or {}
    matched = matching_manifests(
        config, {stage: {fingerprints[stage], *(accepted or {}).get(stage, ())} for stage in config.stages}, manifests)
    runs: set[str] = set()
    plans: list[StagePlan] = []
    for name in dag.topological_order(graph):
        spec = config.stages[name]
        fp = fingerprints[name]
        manifest = manifests.get(name)
        reason = None
        same_config = name in matched
        if manifest is None:
            reason = "not run yet"
        elif not same_config and (difference := _config_difference(spec, manifest)):
            reason = difference
        elif name in broken:
            reason = f"outputs damaged: {broken[name]}"
        else:
            for role, upstream in spec.inputs.items():
                recorded = manifest.inputs.get(role)
                current = manifests.get(upstream)
                if upstream in runs:
                    reason = f"input {upstream!r} re-runs"
                elif recorded is None or current is None or recorded.manifest_sha256 != manifest_digest(current):
                    reason = f"input {upstream!r} changed"
                if reason:
                    break
            if reason is None and not same_config:
                reason = "config changed (the seed)"  # neither its params nor its inputs differ
        if name in forced:
            reason = "forced by --from"
        if only:
            if name in only:
                plans.append(StagePlan(name, "run", "selected by --only", fp))
                runs.add(name)
                continue
            plans.append(StagePlan(name, "leave", reason or "up to date", fp))
            continue
        if reason:
            plans.append(StagePlan(name, "run", reason, fp))
            runs.add(name)
        else:
            plans.append(StagePlan(name, "skip", "up to date", fp))
    if only:
        by_name = {p.name: p for p in plans}
        for name in only:
            for upstream in config.stages[name].inputs.values():
                if upstream not in only and by_name[upstream].reason != "up to date":
                    raise ConfigError(
                        f"--only {name}: its input stage {upstream!r} is not complete "
                        f"({by_name[upstream].reason}); run it first or add --only {upstream}"
                    )
    return plans


class Executor(Protocol):
    """Runs :class:`StageTask` s somewhere and reports their :class:`StageResult` s."""

    def submit(self, task: StageTask, resources: StageResources) -> Any: ...

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, StageResult]]: ...

    def cancel(self, handle: Any) -> None: ...

    def capacity(self) -> list[dict[str, float]] | None:
        """Each live node's total resources (None: unknown, nothing is checked)."""
        ...


@dataclass
class RunSummary:
    run_uri: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_run_config(storage: Storage) -> RunConfig:
    """The resolved config a run directory recorded (what ``resume`` and ``status`` use)."""
    from pipeline.config import parse_config

    source = storage.uri_of(CONFIG_FILE)
    if not storage.exists(CONFIG_FILE):
        raise ConfigError(f"{source}: not a vitpipe run directory (no {CONFIG_FILE}); start it with `vitpipe run`")
    try:
        raw = json.loads(storage.read_text(CONFIG_FILE))
    except ValueError:
        raise ConfigError(f"{source}: the recorded config is not valid JSON") from None
    return parse_config(raw, source=source)


class _StageBar:
    """Driver-side progress over stages; draws only on a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="stages", unit="stage", file=sys.stderr, leave=False)

    def advance(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(label)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_pipeline(
    config: RunConfig,
    run_uri: str,
    executor: Executor,
    only: Collection[str] = (),
    from_stages: Collection[str] = (),
    show_progress: bool = False,
    verify: bool = True,
    lock: RunLock | None = None,
) -> RunSummary:
    """Run (or resume) the pipeline in ``run_uri``; returns a summary, raises on stage failure.

    Pass ``lock`` when the caller already holds the run lock (the CLI takes it before starting
    Ray, so a second driver is refused at once); it is released on return either way.
    """
    storage = open_storage(run_uri, config.storage)
    with lock or acquire_run_lock(storage) as held:
        return _Driver(config, storage, executor, show_progress, held).run(only, from_stages, verify)


class _Driver:
    def __init__(self, config: RunConfig, storage: Storage, executor: Executor, show_progress: bool,
                 lock: RunLock) -> None:
        self.config = config
        self.lock = lock
        self.storage = storage
        self.executor = executor
        self.show_progress = show_progress
        self.events = EventLog(storage, config.name)
        self.state: RunState = load_state(storage, config.name)
        self._resumed: dict[str, bool] = {}
        self.trackers: TrackerIds | None = None
        self.accepted: dict[str, frozenset[str]] = {}  # per stage: the fingerprints of this config

    def _save(self) -> None:
        self.lock.check()  # a driver that lost the run writes nothing more
        save_state(self.storage, self.state)

    def run(self, only: Collection[str], from_stages: Collection[str], verify: bool) -> RunSummary:
        config, storage = self.config, self.storage
        storage.write_text(CONFIG_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        fps = stage_fingerprints(config)
        self.accepted = accepted_fingerprints(config)
        manifests = {name: read_manifest(storage.child(stage_folder(name))) for name in config.stages}
        broken = {}
        if verify:
            matched = matching_manifests(config, self.accepted, manifests)
            for name, manifest in manifests.items():
                if manifest is not None and name in matched:
                    problems = verify_outputs(storage.child(stage_folder(name)), manifest)
                    if problems:
                        broken[name] = problems[0]
        plans = plan_run(config, fps, manifests, only, from_stages, broken, self.accepted)
        to_run = [p for p in plans if p.action == "run"]
        self._preflight(to_run)  # before anything is moved or written
        self.trackers = self._start_tracking() if to_run else None
        summary = RunSummary(storage.uri)
        self.events.emit("run_started", uri=storage.uri,
                         plan={p.name: {"action": p.action, "reason": p.reason} for p in plans})
        for p in plans:
            if p.action == "skip":
                st = self.state.stage(p.name)
                st.status, st.fingerprint, st.error = "done", p.fingerprint, None
                if st.duration_s is None and manifests[p.name] is not None:
                    st.duration_s = manifests[p.name].timings.get("duration_s")
                summary.skipped.append(p.name)
                log.info("stage %s: up to date, skipped", p.name)
                self.events.emit("stage_skipped", stage=p.name, reason=p.reason)
        for p in to_run:
            self._prepare(p)
        self._save()

        graph = {name: list(spec.inputs.values()) for name, spec in config.stages.items()}
        available = {p.name: manifests[p.name] for p in plans if p.action != "run" and manifests[p.name]}
        pending = list(to_run)
        running: dict[Any, StagePlan] = {}
        bar = _StageBar(len(to_run), self.show_progress)
        try:
            while pending or running:
                for p in list(pending):
                    ups = graph[p.name]
                    if any(u in summary.failed or u in summary.blocked for u in ups):
                        pending.remove(p)
                        self._block(p, summary)
                        bar.advance(f"{p.name} blocked")
                    elif all(u in available for u in ups):
                        pending.remove(p)
                        running[self._submit(p, fps, available)] = p
                if not running:
                    if pending:  # cannot happen for a validated DAG; fail loudly rather than spin
                        raise RuntimeError(f"scheduler stalled with pending stages {[p.name for p in pending]}")
                    continue
                for handle, result in self.executor.wait(list(running), timeout=1.0):
                    self.lock.check()
                    p = running.pop(handle)
                    self._finish(p, result, summary, available)
                    bar.advance(f"{p.name} {'done' if result.ok else 'failed'}")
                self.lock.check()
        except RunLockLostError:
            # Another driver may own the run now: stop our stage tasks and write nothing at all.
            for handle in running:
                self.executor.cancel(handle)
            raise
        except BaseException as err:
            # Ctrl-C / SIGTERM (or a driver bug): stop stage tasks, record them as interrupted.
            for handle, p in running.items():
                self.executor.cancel(handle)
                st = self.state.stage(p.name)
                st.status, st.error = "interrupted", f"driver stopped: {type(err).__name__}"
                self.events.emit("stage_interrupted", stage=p.name)
            self._save()
            self.events.emit("run_interrupted", reason=type(err).__name__)
            self._finish_tracking(ok=False)
            raise
        finally:
            bar.close()
        self.events.emit("run_finished", ok=summary.ok, ran=summary.ran, skipped=summary.skipped,
                         failed=summary.failed, blocked=summary.blocked)
        self._save()
        self._finish_tracking(ok=summary.ok)
        if not summary.ok:
            first = next(iter(summary.failed.items()), None)
            detail = f"stage {first[0]!r} failed: {first[1]}" if first else "some stages were blocked"
            raise StageFailedError(f"{storage.uri}: {detail} (see `vitpipe status {storage.uri}`)")
        return summary

    def _start_tracking(self) -> TrackerIds | None:
        """The run's MLflow / W&B runs: continued from ``tracking.json`` on a resume, else new; the
        resolved config goes in as params (masked: ``pipeline.trackers``)."""
        previous = TrackerIds.from_json(json.loads(self.storage.read_text(TRACKING_FILE))) \
            if self.storage.exists(TRACKING_FILE) else None
        ids = start_tracking(self.config.tracking, self.config.name, previous)
        if ids is not None:
            self.storage.write_text(TRACKING_FILE, json.dumps(ids.to_json(), indent=2) + "\n")
            with TrackerWriter(ids) as writer:
                writer.log_params(self.config.to_dict())
        return ids

    def _finish_tracking(self, ok: bool) -> None:
        try:
            finish_tracking(self.trackers, ok)
        except VitpipeError as err:  # the run's outcome stands; its tracker shows it as still running
            log.warning("could not mark the tracker run %s: %s", "finished" if ok else "failed", err)

    def _preflight(self, to_run: Sequence[StagePlan]) -> None:
        """Refuse at once a stage the cluster can never run (Ray would queue it forever)."""
        if self.config.ray.autoscaling or not to_run:
            return
        nodes = self.executor.capacity()
        if nodes is None:
            return
        for p in to_run:
            spec = self.config.stages[p.name]
            stage_cls = registry.find_stage(spec.type)
            if stage_cls is None or spec.resources is None:
                continue
            demand = stage_cls.resource_demand(stage_cls.Params.model_validate(spec.params))
            reason = infeasible_reason(p.name, task_demand(spec.resources), demand, nodes)
            if reason:
                raise VitpipeError(reason)

    def _prepare(self, p: StagePlan) -> None:
        """Remove the old commit record; move the folder aside unless the same attempt is resumed."""
        stage_storage = self.storage.child(stage_folder(p.name))
        st = self.state.stage(p.name)
        self._settle_set_aside(p.name, st)
        resumable = (
            st.fingerprint in self.accepted[p.name]
            and st.status in ("running", "interrupted", "failed", "pending", "blocked")
            and p.reason != "forced by --from"
        )
        if resumable:
            stage_storage.delete(MANIFEST_NAME)
        else:
            self._set_aside(p, st)
            st.attempts = 0
        st.status, st.fingerprint, st.error = "pending", p.fingerprint, None
        st.started = st.finished = None
        st.duration_s = None
        self._resumed[p.name] = resumable and st.attempts > 0

    def _set_aside(self, p: StagePlan, st: StageState) -> None:
        """Move whatever the stage's folder holds aside: a finished result (it has a manifest) to
        ``stages/NAME.previous/``, an unfinished attempt (checkpoints, an error) to
        ``stages/NAME.partial/``, each replacing the one before — so a failed attempt never
        pushes out the last finished result. Copy everything (hard links on a disk, server-side
        copies on S3), write the marker, then remove the originals, the commit record first.

        Crash-safe with :meth:`_settle_set_aside`: a token is saved in the run state before
        anything moves and written into the marker once the copy is complete."""
        folder = stage_folder(p.name)
        objects = self.storage.list(folder)
        if not objects:
            return
        finished = any(o.path == f"{folder}/{MANIFEST_NAME}" for o in objects)
        aside = folder + (PREVIOUS_SUFFIX if finished else PARTIAL_SUFFIX)
        st.setting_aside = uuid.uuid4().hex
        self._save()
        self.storage.delete_prefix(aside)
        copied = self.storage.copy_prefix(folder, aside)
        self.storage.write_text(f"{aside}/{SET_ASIDE_FILE}", json.dumps({
            "token": st.setting_aside, "stage": p.name, "reason": p.reason, "fingerprint": st.fingerprint,
            "status": st.status, "objects": copied, "time": _now()}, indent=2) + "\n")
        self._remove_originals(folder)
        st.setting_aside = None
        log.warning("stage %s: %s; its %s (%d files) are kept in %s", p.name, p.reason,
                    "previous outputs" if finished else "unfinished attempt's files", copied, self.storage.uri_of(aside))
        self.events.emit("stage_set_aside", stage=p.name, reason=p.reason, to=aside, objects=copied)

    def _settle_set_aside(self, name: str, st: StageState) -> None:
        """Finish what a driver that died while setting a stage's folder aside began: with the
        copy complete (a marker holds the token), remove the originals; otherwise the originals
        were never touched and stay where they are."""
        if st.setting_aside is None:
            return
        folder = stage_folder(name)
        for suffix in (PREVIOUS_SUFFIX, PARTIAL_SUFFIX):
            if self._set_aside_token(f"{folder}{suffix}/{SET_ASIDE_FILE}") == st.setting_aside:
                self._remove_originals(folder)
                st.fingerprint = None  # nothing is left to resume from
                log.warning("stage %s: finished setting its folder aside in %s (an earlier driver stopped "
                            "halfway)", name, self.storage.uri_of(folder + suffix))
        st.setting_aside = None

    def _remove_originals(self, folder: str) -> None:
        self.storage.delete(f"{folder}/{MANIFEST_NAME}")  # first: no commit record over a half-removed folder
        self.storage.delete_prefix(folder)

    def _set_aside_token(self, marker: str) -> str | None:
        """The marker's token; None only when there is no marker. A marker is written whole (one
        PUT, one rename), so any failure to read it is an error to stop on: guessing "no copy"
        would remove the only complete one."""
        if not self.storage.exists(marker):
            return None
        return json.loads(self.storage.read_text(marker))["token"]

    def _submit(self, p: StagePlan, fps: Mapping[str, str], available: Mapping[str, Manifest]) -> Any:
        spec = self.config.stages[p.name]
        st = self.state.stage(p.name)
        st.status, st.started, st.attempts = "running", _now(), st.attempts + 1
        task = StageTask(
            run_uri=self.storage.uri,
            storage_settings=self.config.storage.model_dump(),
            name=p.name,
            type_name=spec.type,
            params=spec.params,
            fingerprint=fps[p.name],
            seed=self.config.seed,
            inputs={role: (up, available[up].model_dump(mode="json"), manifest_digest(available[up]))
                    for role, up in spec.inputs.items()},
            plugins=list(self.config.plugins),
            attempt=st.attempts,
            resumed=self._resumed.get(p.name, False),
            show_progress=self.show_progress,
            trackers=self.trackers,
        )
        assert spec.resources is not None  # filled in by parse_config
        handle = self.executor.submit(task, spec.resources)
        self._save()
        log.info("stage %s: started (%s)", p.name, p.reason)
        self.events.emit("stage_started", stage=p.name, type=spec.type, reason=p.reason, attempt=st.attempts,
                         resources=spec.resources.model_dump())
        return handle

    def _finish(self, p: StagePlan, result: StageResult, summary: RunSummary,
                available: dict[str, Manifest]) -> None:
        st = self.state.stage(p.name)
        st.finished = _now()
        st.duration_s = round(result.duration_s, 3)
        if result.ok and result.manifest is not None:
            st.status, st.error = "done", None
            available[p.name] = Manifest.model_validate(result.manifest)
            summary.ran.append(p.name)
            log.info("stage %s: done in %.1fs", p.name, result.duration_s)
            self.events.emit("stage_finished", stage=p.name, duration_s=st.duration_s,
                             outputs=len(result.manifest.get("outputs", [])))
        else:
            st.status, st.error = "failed", result.error
            summary.failed[p.name] = result.error or "unknown error"
            log.error("stage %s: failed: %s", p.name, result.error)
            self.events.emit("stage_failed", stage=p.name, duration_s=st.duration_s, error=result.error)
        self._save()

    def _block(self, p: StagePlan, summary: RunSummary) -> None:
        st = self.state.stage(p.name)
        st.status, st.error = "blocked", "an input stage failed"
        summary.blocked.append(p.name)
        self.events.emit("stage_blocked", stage=p.name)
        self._save()
