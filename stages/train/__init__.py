"""Training machinery shared by the pretrain and finetune stages (schedules, DeepSpeed config,
checkpoints, the Ray Train worker loop)."""
