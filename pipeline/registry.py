"""Stage types, found by name.

Stage modules register their classes with :func:`register_stage`. The engine never imports a
stage module directly: :func:`load_plugins` imports the default ``stages`` package plus any
modules a config lists under ``plugins``, by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.stage import Stage

__all__ = ["register_stage", "find_stage", "stage_types", "load_plugins", "DEFAULT_PLUGINS"]

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


def load_plugins(modules: Iterable[str] = (), source: str = "<config>") -> None:
    """Import the default stage package and the given plugin modules (idempotent)."""
    for name in (*DEFAULT_PLUGINS, *modules):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                raise ConfigError(f"{source}: plugins: cannot import module {name!r}") from None
            raise
