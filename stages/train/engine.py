"""Building the DeepSpeed engine around the single-device ViT, inside each worker.

The batch geometry and the DeepSpeed config depend on the world size the workers actually have,
so they are resolved here, once. The model is built from the same seed on every rank (identical
initial weights); a fine-tune's pretrained weights are read by rank 0 alone and broadcast, so a
128-rank job reads the handoff from storage once, not 128 times.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import DeterministicError, VitpipeError
from stages.model.handoff import read_handoff
from stages.model.transfer import load_transferred
from stages.model.vit import ViT, count_params
from stages.train.context import WorkerContext
from stages.train.ds_config import build_deepspeed_config
from stages.train.geometry import StepGeometry
from stages.train.job import FinetuneTask, OptimizerSpec, TrainJob

__all__ = ["param_groups", "build_optimizer", "build_engine", "set_lr", "training_dtype", "WeightsOnlyLoads",
           "deepspeed_safe_globals", "weights_only_loads"]


def param_groups(model: ViT, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed, and what the model exempts (``ViT.no_weight_decay``)."""
    exempt = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if n not in exempt]
    no_decay = [p for n, p in model.named_parameters() if n in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: ViT, spec: OptimizerSpec) -> torch.optim.Optimizer:
    if spec.name == "sgd":  # the paper's fine-tuning optimiser: momentum 0.9, no weight decay
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=0.0)
    return torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas, eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def training_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _load_pretrained(model: ViT, task: FinetuneTask, job: TrainJob, worker: WorkerContext) -> None:
    """Rank 0 reads and checks the handoff; every rank then receives the weights by broadcast."""
    error = None
    if worker.is_main:
        try:
            handoff = read_handoff(task.init, job.output.storage)
            load_transferred(model, handoff.config, handoff.state)
        except Exception as err:  # noqa: BLE001 - whatever it is, every rank must hear of it (or hang below)
            error = " ".join(str(err).split()) if isinstance(err, VitpipeError) else f"{type(err).__name__}: {err}"
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)  # every rank fails alike instead of hanging below
    if verdict[0] is not None:
        raise DeterministicError(str(verdict[0]))
    model.to(worker.device)
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _skip_cpu_inference_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce.

    DeepSpeed 0.19 builds that C++ op with g++ when its communication backend starts, unless
    ``deepspeed.ops.__compatible_ops__`` says the op is unusable (``build_shm_op``). Only its
    *inference* all-reduce uses the op; training's collectives go through torch.distributed. The
    build cost ~50 s on 2 busy cores at the start of a stage, again for every new environment
    path (a fresh clone, a new venv). An empty table also skips probing every op at import.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def build_engine(job: TrainJob, worker: WorkerContext, load_universal: bool = False) -> tuple[Any, StepGeometry]:
    """(DeepSpeed engine, the geometry resolved for this world size). ``load_universal``: the engine
    will load a universal checkpoint (written by another number of workers)."""
    try:
        geometry = job.batch.resolve(worker.world_size)
    except ValueError as err:
        raise DeterministicError(f"cannot train on {worker.world_size} worker(s): {err}") from None
    if worker.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        _skip_cpu_inference_comm_build()
    # DeepSpeed 0.19.8 calls torch.distributed collectives that torch has renamed; torch warns at
    # every call, i.e. several lines per step on every rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed

    torch.manual_seed(job.seed)  # identical initial weights on every rank
    model = ViT(job.model)
    if isinstance(job.task, FinetuneTask):
        _load_pretrained(model, job.task, job, worker)
    d = job.distributed
    config = build_deepspeed_config(
        global_batch=geometry.global_batch, micro_batch=geometry.micro_batch, world_size=geometry.world_size,
        zero_stage=d.zero_stage, precision=d.precision, grad_clip=job.optimizer.grad_clip,
        offload_optimizer=d.offload_optimizer, offload_params=d.offload_params, grad_comm_fp32=d.grad_comm_fp32,
        model_params=count_params(job.model), load_universal=load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, job.optimizer),
                                           config=config)
    engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
    return engine, geometry


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19's checkpoints hold besides tensors and plain data (found by loading
    ZeRO 0-3 fp32 and bf16 checkpoints with ``weights_only=True``): small records, no code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with loads that unpickle tensors and plain data only.

    DeepSpeed's own engine unpickles whatever its files hold: a checkpoint folder anyone could
    write to (a shared bucket) could run code in every worker. Files are checked against the
    commit record before any load (:class:`~stages.train.checkpointer.Checkpointer`); this refuses
    whatever else a file might hold. Saving and everything else is DeepSpeed's own engine.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def weights_only_loads(transform: Callable[[Any], Any] | None = None) -> Iterator[None]:
    """For the length of the block, every ``torch.load`` in this process unpickles tensors and plain
    data only (plus :func:`deepspeed_safe_globals`). DeepSpeed's universal-checkpoint loader and
    converter call ``torch.load`` themselves, past the checkpoint engine; used around those calls,
    at start-up, before any other thread loads anything. ``transform``: applied to what every load
    returns (how the conversion shows DeepSpeed SGD state under Adam's names)."""
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            loaded = original(f, *args, **kwargs)
        return loaded if transform is None else transform(loaded)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original
