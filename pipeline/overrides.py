"""Dotted command-line overrides: ``vitpipe run CONFIG pretrain.steps=200 seed=1``.

Values are parsed as YAML scalars/flow collections, so ``200`` is an int, ``0.1`` a float,
``true`` a bool, ``[1, 5, 10]`` a list and ``null`` None — the same types the config file would
give. A key whose first part is a stage name (and not a top-level field) is shorthand for that
stage's params: ``pretrain.steps=200`` means ``stages.pretrain.params.steps=200``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.yamlio import safe_load

__all__ = ["parse_override", "expand_key", "apply_overrides"]

_TOP_LEVEL = {"name", "description", "seed", "run_dir", "plugins", "storage", "ray", "stages"}
_STAGE_FIELDS = {"type", "inputs", "params", "resources"}


def parse_override(text: str, source: str = "<overrides>") -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and parsed value."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: override {text!r}: expected KEY=VALUE, e.g. pretrain.steps=200")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"{source}: override {text!r}: empty part in key {key!r}")
    try:
        value = safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text  # not YAML: keep the literal string, validation will judge it
    return parts, value


def expand_key(parts: list[str], stage_names: Sequence[str]) -> list[str]:
    """Apply the stage-params shorthand to a key path."""
    head = parts[0]
    if head in _TOP_LEVEL or head not in stage_names:
        return parts
    if len(parts) > 1 and parts[1] in _STAGE_FIELDS:
        return ["stages", *parts]
    return ["stages", head, "params", *parts[1:]]


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str = "<config>") -> dict[str, Any]:
    """Return ``raw`` with each override applied in order (mutates and returns ``raw``)."""
    for text in overrides:
        parts, value = parse_override(text, source=source)
        stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
        path = expand_key(parts, list(stages))
        node: Any = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"{source}: override {text!r}: {where} is not a mapping")
            node = child
        node[path[-1]] = value
    return raw
