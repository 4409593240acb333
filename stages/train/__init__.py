"""The trainer shared by the pretrain and finetune stages: the typed training job, the engine,
the step, metrics, checkpoints, evaluation and the loop every worker runs (see ``loop.py``)."""
