"""Stage types. Importing this package registers every built-in stage with the engine."""

from stages import ingest, pretrain, smoke  # noqa: F401  (each module registers its stage types)
