"""Stage types, found by name.

Stage modules register their classes with :func:`register_stage`. The engine never imports a
stage module directly: :func:`load_plugins` imports the default ``stages`` package plus any
modules a config lists under ``plugins``, by name.

A stage type may also register a capacity planner (:func:`register_planner`), which
``vitpipe plan`` calls to estimate what the stage needs on a given cluster without running it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.stage import Stage

__all__ = ["register_stage", "find_stage", "stage_types", "load_plugins", "DEFAULT_PLUGINS",
           "PlanOptions", "Planner", "register_planner", "find_planner", "planner_types"]

DEFAULT_PLUGINS = ("stages",)

_REGISTRY: dict[str, type[Stage]] = {}
_S = TypeVar("_S", bound="type[Stage]")


def register_stage(type_name: str) -> Callable[[_S], _S]:
    """Class decorator: make a :class:`~pipeline.stage.Stage` subclass available as ``type_name``."""

    def decorate(cls: _S) -> _S:
        existing = _REGISTRY.get(type_name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"stage type {type_name!r} is registered twice ({existing} and {cls})")
        cls.type_name = type_name
        _REGISTRY[type_name] = cls
        return cls

    return decorate


def find_stage(type_name: str) -> type[Stage] | None:
    return _REGISTRY.get(type_name)


def stage_types() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class PlanOptions:
    """The cluster a plan is made for (``vitpipe plan`` flags); ``None`` means the planner's default."""

    nodes: int = 1
    gpus_per_node: int = 1
    gpu: str | None = None  # None: the stage's own ``gpu`` param
    mfu: float = 0.4
    decode_rate: float | None = None  # images/s one CPU core decodes and augments
    num_classes: int | None = None  # None: inferred from the stage's input where the planner can


@dataclass(frozen=True)
class Planner:
    """A stage type's capacity model.

    ``plan(config, stage_name, options)`` returns plain JSON-able data (raising
    :class:`~pipeline.errors.VitpipeError` for a user error); ``render(plan)`` turns that data into
    plain-text lines. Both stay in the stage's module, so the engine needs no stage knowledge.
    """

    plan: Callable[[RunConfig, str, PlanOptions], dict[str, Any]]
    render: Callable[[dict[str, Any]], str]


_PLANNERS: dict[str, Planner] = {}
_P = TypeVar("_P", bound=Callable[..., dict[str, Any]])


def register_planner(type_name: str, render: Callable[[dict[str, Any]], str]) -> Callable[[_P], _P]:
    """Function decorator: make ``plan(config, stage_name, options) -> dict`` the planner of ``type_name``."""

    def decorate(plan: _P) -> _P:
        existing = _PLANNERS.get(type_name)
        if existing is not None and existing.plan.__qualname__ != plan.__qualname__:
            raise ValueError(f"stage type {type_name!r} has two planners ({existing.plan} and {plan})")
        _PLANNERS[type_name] = Planner(plan=plan, render=render)
        return plan

    return decorate


def find_planner(type_name: str) -> Planner | None:
    return _PLANNERS.get(type_name)


def planner_types() -> list[str]:
    return sorted(_PLANNERS)


def load_plugins(modules: Iterable[str] = (), source: str = "<config>") -> None:
    """Import the default stage package and the given plugin modules (idempotent)."""
    for name in (*DEFAULT_PLUGINS, *modules):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                raise ConfigError(f"{source}: plugins: cannot import module {name!r}") from None
            raise
