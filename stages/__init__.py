"""Stage types. Importing this package registers every built-in stage with the engine."""

from stages import smoke  # noqa: F401  (registers smoke.* stages)
