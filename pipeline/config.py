"""Typed, validated run configs.

A run config is a YAML file: global settings plus a mapping of stage instances, each naming its
stage type, its inputs (other stage instances), its params and its resources. Loading does every
check that can be done without running anything, so a bad config fails in a second with one line
naming the file, the field and what was expected, instead of an hour into a run:

- unknown keys and wrong types (pydantic, strict, ``extra="forbid"``);
- stage types that are not registered, params that do not fit the stage's own params model
  (including its cross-field checks, e.g. batch divisibility);
- inputs naming a stage that does not exist, missing or unexpected input roles, and cycles.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from pipeline import dag
from pipeline.errors import ConfigError
from pipeline.overrides import apply_overrides
from pipeline.strict import StrictModel
from pipeline.trackers import TrackingSettings
from pipeline.yamlio import safe_load

__all__ = [
    "StrictModel",
    "StageResources",
    "StageSpec",
    "StorageSettings",
    "RaySettings",
    "RunConfig",
    "load_config",
    "parse_config",
    "format_validation_error",
]


class StageResources(StrictModel):
    """What one stage's coordinating Ray task asks for.

    Stages that fan out work (ingest tasks, Ray Train workers) declare their workers' resources
    themselves; this is only the task that runs the stage's ``run``.
    """

    cpus: float = Field(default=1.0, ge=0)
    gpus: float = Field(default=0.0, ge=0)
    memory_gb: float | None = Field(default=None, gt=0)
    custom: dict[str, float] = Field(default_factory=dict)


class StageSpec(StrictModel):
    """One stage instance in the DAG."""

    type: str
    inputs: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    resources: StageResources | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_from_list(cls, value: Any) -> Any:
        # `inputs: [a, b]` is shorthand for `inputs: {a: a, b: b}` (role = upstream stage name).
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return {v: v for v in value}
        return value


class StorageSettings(StrictModel):
    """How to reach the run's storage. Credentials are never config: boto3 finds them."""

    endpoint_url: str | None = None
    region: str | None = None
    multipart_threshold_mb: int = Field(default=64, ge=5)
    multipart_chunk_mb: int = Field(default=64, ge=5)
    read_timeout_s: float = Field(default=60.0, gt=0, description="S3: a read stalled this long is a fault")
    read_retries: int = Field(default=8, ge=0, description="S3: faults in a row, without progress, "
                                                            "survived by reading on from the byte reached")


class RaySettings(StrictModel):
    """Where stages run: an embedded local Ray instance (address unset) or an existing cluster."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    include_dashboard: bool = True
    dashboard_port: int | None = Field(default=None, ge=1, le=65535)
    # A cluster that adds nodes on demand: a stage asking for more than it has now is not refused.
    autoscaling: bool = False


class RunConfig(StrictModel):
    """A whole pipeline: global settings and the stage DAG."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    run_dir: str | None = None
    plugins: list[str] = Field(default_factory=list)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)  # MLflow / W&B, off by default
    stages: dict[str, StageSpec]

    @field_validator("stages")
    @classmethod
    def _non_empty(cls, value: dict[str, StageSpec]) -> dict[str, StageSpec]:
        if not value:
            raise ValueError("at least one stage is required")
        for name in value:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"bad stage name {name!r}: use letters, digits, '_', '-' and '.'")
            if name.endswith((".previous", ".partial")):  # the folders re-runs set a stage's files aside in
                raise ValueError(f"bad stage name {name!r}: names ending in .previous or .partial are reserved")
        return value

    def default_run_dir(self) -> str:
        return self.run_dir or os.path.join("runs", self.name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what a run directory records)."""
        return self.model_dump(mode="json")


def format_validation_error(source: str, err: ValidationError, prefix: Sequence[str | int] = ()) -> str:
    """Turn the first pydantic error into ``SOURCE: dotted.field: what was expected``."""
    first = err.errors()[0]
    loc = [*prefix, *first.get("loc", ())]
    # Pydantic appends the function name of after-validators to loc; keep field names only.
    loc = [p for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    field = ".".join(str(p) for p in loc) or "(top level)"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "required field is missing"
    else:
        message = first.get("msg", "invalid value")
        message = message.removeprefix("Value error, ")
        if "input" in first and kind not in ("value_error", "assertion_error"):
            shown = repr(first["input"])
            if len(shown) > 60:
                shown = shown[:57] + "..."
            message = f"{message}, got {shown}"
    return f"{source}: {field}: {message}"


def _allowed_fields(model: type[BaseModel]) -> str:
    return ", ".join(sorted(model.model_fields))


def parse_config(raw: Mapping[str, Any], source: str = "<config>") -> RunConfig:
    """Validate raw config data (already overridden) into a :class:`RunConfig`.

    Checks the schema, the stage types and their params, and the graph. Raises
    :class:`ConfigError` with one line on the first problem found.
    """
    # Imported here to keep the module graph acyclic: registry imports config's StrictModel.
    from pipeline import registry

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = RunConfig.model_validate(dict(raw))
    except ValidationError as err:
        line = format_validation_error(source, err)
        if err.errors()[0].get("type") == "extra_forbidden":
            loc = err.errors()[0]["loc"]
            model = _model_at(loc)
            if model is not None:
                line += f" (expected one of: {_allowed_fields(model)})"
        raise ConfigError(line) from None

    registry.load_plugins(config.plugins, source=source)
    for name, spec in config.stages.items():
        where = f"stages.{name}"
        stage_cls = registry.find_stage(spec.type)
        if stage_cls is None:
            known = ", ".join(registry.stage_types()) or "none"
            raise ConfigError(f"{source}: {where}.type: unknown stage type {spec.type!r} (registered: {known})")
        for role, upstream in spec.inputs.items():
            if upstream not in config.stages:
                raise ConfigError(
                    f"{source}: {where}.inputs.{role}: names stage {upstream!r}, which does not exist "
                    f"(stages: {', '.join(config.stages)})"
                )
            if upstream == name:
                raise ConfigError(f"{source}: {where}.inputs.{role}: a stage cannot be its own input")
        missing = [r for r in stage_cls.input_roles if r not in spec.inputs]
        if missing:
            raise ConfigError(
                f"{source}: {where}.inputs: stage type {spec.type!r} needs input role(s) {', '.join(missing)}"
            )
        if not stage_cls.accepts_extra_inputs:
            extra = [r for r in spec.inputs if r not in stage_cls.input_roles]
            if extra:
                expected = ", ".join(stage_cls.input_roles) or "no inputs"
                raise ConfigError(
                    f"{source}: {where}.inputs.{extra[0]}: unexpected input role for {spec.type!r} "
                    f"(expected: {expected})"
                )
        try:
            params = stage_cls.Params.model_validate(spec.params)
        except ValidationError as err:
            line = format_validation_error(source, err, prefix=("stages", name, "params"))
            if err.errors()[0].get("type") == "extra_forbidden":
                line += f" (expected one of: {_allowed_fields(stage_cls.Params)})"
            raise ConfigError(line) from None
        # Store params with defaults filled in so the run records exactly what ran.
        spec.params = params.model_dump(mode="json")
        if spec.resources is None:
            spec.resources = stage_cls.default_resources()

    graph = {name: list(spec.inputs.values()) for name, spec in config.stages.items()}
    cycle = dag.find_cycle(graph)
    if cycle:
        raise ConfigError(f"{source}: stages: the inputs form a cycle: {' -> '.join(cycle)}")
    return config


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The config model that owns the field at ``loc`` (for listing the allowed fields)."""
    model: type[BaseModel] = RunConfig
    path = list(loc[:-1])
    while path:
        key = path.pop(0)
        if model is RunConfig and key == "stages":
            if not path:
                return None
            path.pop(0)  # the stage name
            model = StageSpec
            continue
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping from a file, with one-line errors for the usual mistakes."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, expected a YAML config file") from None
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config file: {err.strerror}") from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML: {where}{problem}") from None
    if data is None:
        raise ConfigError(f"{source}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Load, override and validate a run config file."""
    source = str(path)
    raw = read_yaml(path)
    raw = apply_overrides(copy.deepcopy(raw), overrides, source=source)
    return parse_config(raw, source=source)
