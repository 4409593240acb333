"""Stage fingerprints: what decides whether a finished stage is still up to date.

A stage's fingerprint hashes its type, its validated params (defaults filled in), the run seed and
the fingerprints of its inputs, so a change anywhere upstream changes every fingerprint below it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pipeline import dag

__all__ = ["canonical_json", "stage_fingerprint", "stage_fingerprints"]


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data always gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def stage_fingerprint(type_name: str, params: Mapping[str, Any], seed: int, input_fps: Mapping[str, str]) -> str:
    payload = {"type": type_name, "params": dict(params), "seed": seed, "inputs": dict(input_fps)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:32]


def stage_fingerprints(config: Any) -> dict[str, str]:
    """Fingerprints of every stage of a validated RunConfig, computed in topological order."""
    graph = {name: list(spec.inputs.values()) for name, spec in config.stages.items()}
    fps: dict[str, str] = {}
    for name in dag.topological_order(graph):
        spec = config.stages[name]
        input_fps = {role: fps[upstream] for role, upstream in spec.inputs.items()}
        fps[name] = stage_fingerprint(spec.type, spec.params, config.seed, input_fps)
    return fps
