"""The base of every config model (its own module: the run config and the settings it holds share it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys and loose type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)
