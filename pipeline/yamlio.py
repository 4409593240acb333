"""YAML loading with one fix over PyYAML's YAML 1.1 rules: ``1e-3`` is a float.

PyYAML only reads exponent floats that contain a dot (``1.0e-3``), so a learning rate written
``1e-3`` would load as the string "1e-3" and fail validation; YAML 1.2 and every user expect a
number.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["safe_load"]


class _Loader(yaml.SafeLoader):
    pass


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, rx) for tag, rx in _resolvers if tag != "tag:yaml.org,2002:float"]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
