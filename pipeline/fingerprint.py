"""Stage fingerprints: what decides whether a finished stage is still up to date.

A stage's fingerprint hashes its type, the params that decide its result (validated, defaults
filled in; its params model's ``result_params``, which leaves out execution params such as worker
counts), the run seed and the fingerprints of its inputs, so a change anywhere upstream changes
every fingerprint below it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pipeline import dag

__all__ = ["accepted_fingerprints", "canonical_json", "result_params", "stage_fingerprint", "stage_fingerprints"]


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data always gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def stage_fingerprint(type_name: str, params: Mapping[str, Any], seed: int, input_fps: Mapping[str, str]) -> str:
    payload = {"type": type_name, "params": dict(params), "seed": seed, "inputs": dict(input_fps)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:32]


def result_params(type_name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The result-defining part of a stage's validated params (all of them for an unknown type)."""
    from pipeline.registry import find_stage

    stage_cls = find_stage(type_name)
    if stage_cls is None:
        return dict(params)
    return stage_cls.Params.model_validate(params).result_params()


def stage_fingerprints(config: Any, *, all_params: bool = False) -> dict[str, str]:
    """Fingerprints of every stage of a validated RunConfig, computed in topological order.

    ``all_params``: hash every param, execution params included — how versions before 2026-12-02
    fingerprinted stages. The engine accepts a manifest with that fingerprint as up to date, so
    runs made before execution params left the fingerprint do not re-run finished stages.
    """
    graph = {name: list(spec.inputs.values()) for name, spec in config.stages.items()}
    fps: dict[str, str] = {}
    for name in dag.topological_order(graph):
        spec = config.stages[name]
        input_fps = {role: fps[upstream] for role, upstream in spec.inputs.items()}
        params = dict(spec.params) if all_params else result_params(spec.type, spec.params)
        fps[name] = stage_fingerprint(spec.type, params, config.seed, input_fps)
    return fps


def accepted_fingerprints(config: Any) -> dict[str, frozenset[str]]:
    """Per stage, the fingerprints that mean "this config": today's, and the all-params one of
    earlier versions (see :func:`stage_fingerprints`)."""
    today, before = stage_fingerprints(config), stage_fingerprints(config, all_params=True)
    return {name: frozenset({today[name], before[name]}) for name in today}
