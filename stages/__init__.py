"""Stage types. Importing this package registers every built-in stage (and planner) with the engine."""

from stages import (  # noqa: F401  (each registers stage types or planners)
    fewshot,
    finetune,
    ingest,
    planner,
    pretrain,
    report,
    smoke,
)
