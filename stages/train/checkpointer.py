"""Saving and restoring every stateful part of training together, as one committed checkpoint.

The parts: the DeepSpeed engine (model, optimizer, LR-free engine state, written by DeepSpeed),
and per rank a JSON file ``state-rank{R}.json`` holding the JSON-able parts — the data loader's
position and the train state (metrics history on rank 0, the sample ledger when audited). No
random generator state: every seed is derived from the run's seed and a position in the global
order (dropout and stochastic depth: ``stages.train.step.mask_seed``), so it needs no saving. :class:`~stages.train.checkpoint.CheckpointStore` makes the whole commit atomic
(``COMPLETE.json`` last) and keeps the newest ``keep`` checkpoints.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pipeline.errors import DeterministicError
from stages.train.checkpoint import CheckpointDamaged, CheckpointStore
from stages.train.context import WorkerContext
from stages.train.metrics import StepRecord
from stages.train.reshard import (
    UNIVERSAL,
    Reshard,
    momentum_from_adam_state,
    universal_form,
    universal_params_loaded,
)

__all__ = ["Stateful", "TrainState", "Checkpointer"]

log = logging.getLogger("vitpipe.train")

# DeepSpeed drops recovery scripts (which unpickle checkpoints) beside every save; the handoff is
# safetensors, so they are not kept among the stage's outputs.
_DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LedgerEntry = tuple[int, list[str]]  # (global step, the keys of the samples this rank consumed in it)


@dataclass
class TrainState:
    """What the loop itself accumulates: the metrics history (rank 0) and the sample ledger."""

    history: list[StepRecord] = field(default_factory=list)
    ledger: list[LedgerEntry] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [r.to_json() for r in self.history], "ledger": self.ledger}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [StepRecord(**r) for r in state["history"]]
        ledger = state["ledger"]
        if ledger and isinstance(ledger[0], str):  # written before ledgers had steps: one entry, step unknown (0)
            ledger = [(0, ledger)]
        self.ledger = [(step, list(keys)) for step, keys in ledger]


def inherited_ranks(rank: int, written_by: int, world_size: int) -> range:
    """After a resize, the old ranks whose sample ledgers new rank ``rank`` carries on: ``rank``,
    ``rank + world_size``, ... — each old rank's in exactly one new rank, so the ledger files of all
    ranks still hold every sample consumed (the audit of an exact resume)."""
    return range(rank, written_by, world_size)


def merged_ledger(ledgers: Sequence[Sequence[LedgerEntry]]) -> list[LedgerEntry]:
    """Several ranks' ledgers as one, ordered by step (stable: a rank's entries keep their order)."""
    return sorted(((step, list(keys)) for ledger in ledgers for step, keys in ledger), key=lambda entry: entry[0])


def _unshare_step_counters(optimizer: Any) -> None:
    """Give every parameter's optimizer state its own step tensor.

    DeepSpeed's ZeRO-3 universal load (zero/stage3.py) puts one step tensor into every parameter
    group's state, and torch's Adam adds 1 to each group's counter in place: with our two groups
    (decay, no decay) the shared counter advanced twice a step, so Adam's bias correction ran
    ahead and a resharded ZeRO-3 run ended 2e-4 off an uninterrupted one."""
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps torch's optimizer
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


class Checkpointer:
    def __init__(self, store: CheckpointStore, engine: Any, worker: WorkerContext, parts: dict[str, Stateful],
                 keep: int, node_store: CheckpointStore) -> None:
        """``store``: this rank's view of the stage's checkpoints (its own scratch); ``node_store``:
        the same checkpoints with a scratch every rank on this node shares (resharding downloads
        there once per node)."""
        self.store = store
        self.node_store = node_store
        self.engine = engine
        self.worker = worker
        self.parts = parts
        self.keep = keep

    def _state_file(self, directory: Path) -> Path:
        return directory / f"state-rank{self.worker.rank}.json"

    def restore(self, reshard: Reshard | None = None) -> int:
        """Load the newest usable checkpoint into every part; returns its step (0: none, start fresh).

        A collective: every rank fetches and checks its own files (rank 0 also the listing), and
        the ranks agree; a damaged checkpoint is skipped for the previous complete one, with a
        warning naming the file, so one bad write never fails every restart. ``reshard``: the newest
        checkpoint was written by another number of workers; partitioned state is loaded through
        DeepSpeed's universal form (the engine was built for it; ``stages.train.reshard``)."""
        if reshard is not None:
            return self._restore_resharded(reshard)
        damaged = []
        for step in reversed(self.store.steps()):
            record = self.store.record(step)
            written_by = record.get("world_size")
            if written_by is not None and written_by != self.worker.world_size:
                raise DeterministicError(
                    f"checkpoint step {step} was written by {written_by} workers and this run has "
                    f"{self.worker.world_size}: resuming on another number of workers is not supported yet; run "
                    f"with workers={written_by}")
            problem = None
            try:
                if self.worker.is_main:
                    self.store.check_listing(step, record)
                directory = self.store.fetch(step, self.worker.rank, record)
            except CheckpointDamaged as err:
                problem = str(err)
            if self._all_ranks_agree(problem is None):
                self._load(step, directory)
                return step
            self.store.discard_local(step)
            if problem is not None:
                log.warning("rank %d: %s; falling back to the checkpoint before it", self.worker.rank, problem)
            damaged.append(step)
        if damaged:
            raise DeterministicError(f"no usable checkpoint: steps {', '.join(map(str, damaged))} are damaged (the "
                                     "warnings name the files); delete their folders to start the stage over")
        return 0

    def _restore_resharded(self, reshard: Reshard) -> int:
        step, written_by, record = reshard.step, reshard.written_by, reshard.record
        unknown = set(self.parts) - {"loader", "train"}
        if unknown:
            raise DeterministicError(f"cannot reshard checkpoint parts {sorted(unknown)}")
        if reshard.universal:
            self._load_universal(step, written_by)
            dist.barrier()  # every rank on this node has loaded from the node's copy
            self.node_store.discard_local(step)
        else:  # whole, world-size-free state: the rank-less files, loaded as they are
            directory = self.store.fetch(step, self.worker.rank, record)
            self._load_engine(step, directory.parent, directory.name)
        # New rank r carries old ranks r, r + M, ...; a rank beyond the old ones (a grown group)
        # reads one old rank's file for the global cursor. Only new rank 0 reads old rank 0's
        # file, which alone holds the metrics history (~100 MB after 500k steps).
        carried = inherited_ranks(self.worker.rank, written_by, self.worker.world_size)
        states = {old: self.store.read_state(step, old, record) for old in carried or [self.worker.rank % written_by]}
        self.parts["loader"].load_state_dict(next(iter(states.values()))["loader"])  # the cursor is global
        self.parts["train"].load_state_dict({"history": states[0]["train"]["history"] if self.worker.is_main else [],
                                             "ledger": merged_ledger([states[old]["train"]["ledger"]
                                                                      for old in carried])})
        self.store.discard_local(step)
        log.info("rank %d: resumed from checkpoint step %d, written by %d workers, on %d", self.worker.rank, step,
                 written_by, self.worker.world_size)
        return step

    def _load_universal(self, step: int, written_by: int) -> None:
        folder = universal_form(self.store, self.node_store, step, written_by, self.worker,
                                universal_params_loaded(self.engine.optimizer))
        # DeepSpeed's ZeRO-3 universal load gives every parameter group the first group's
        # hyperparameters (zero/stage3.py, "generally ... the same"): ours differ (no weight decay
        # on norms, biases and embeddings), and they are result-defining, so the config's stand.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        self._load_engine(step, folder, UNIVERSAL)
        for group, hyper in zip(self.engine.optimizer.param_groups, groups, strict=True):
            group.update(hyper)
        momentum_from_adam_state(self.engine.optimizer)
        _unshare_step_counters(self.engine.optimizer)

    def _load_engine(self, step: int, folder: Path, tag: str) -> None:
        from stages.train.engine import weights_only_loads

        try:
            with weights_only_loads():  # the universal loader calls torch.load past the checkpoint engine
                loaded, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_module_strict=True)
        except pickle.UnpicklingError as err:
            raise DeterministicError(f"checkpoint step {step}: a file holds objects other than tensors and plain data; "
                                     f"refusing to unpickle it ({str(err).splitlines()[0][:200]})") from None
        if loaded is None:  # DeepSpeed only warns when it finds no model states
            raise DeterministicError(f"checkpoint step {step}: DeepSpeed found no model states in it")

    def _all_ranks_agree(self, ok: bool) -> bool:
        flag = torch.tensor(1.0 if ok else 0.0, device=self.worker.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())  # once per checkpoint tried, at start-up

    def _load(self, step: int, directory: Path) -> None:
        self._load_engine(step, directory.parent, directory.name)
        saved = json.loads(self._state_file(directory).read_text())
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        self.store.discard_local(step)  # loaded: the local copy is no longer needed
        log.info("rank %d: resumed from checkpoint step %d", self.worker.rank, step)

    def save(self, step: int) -> None:
        """Every rank writes its files, publishes them; rank 0 commits and prunes (a collective).

        Weights an update made non-finite are refused first: a checkpoint is what every restart
        resumes from, so a poisoned one would fail every later attempt.
        """
        self._check_finite_weights(step)
        directory = self.store.local_dir(step)
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        self._state_file(directory).write_text(json.dumps({name: p.state_dict() for name, p in self.parts.items()}))
        dist.barrier()  # every rank's files are on disk (DeepSpeed writes some after its own barrier)
        mine = self.store.publish(step, self.worker.rank)
        if self.store.remote:
            shutil.rmtree(directory, ignore_errors=True)  # uploaded: each node's scratch stays small
        listings: list[Any] = [None] * self.worker.world_size
        dist.all_gather_object(listings, mine)
        if self.worker.is_main:
            self.store.commit(step, {rel: meta for listing in listings for rel, meta in listing.items()},
                              world_size=self.worker.world_size)
            for script in _DEEPSPEED_SCRIPTS:
                (directory.parent / script).unlink(missing_ok=True)
            self.store.prune(self.keep)
        dist.barrier()

    def _check_finite_weights(self, step: int) -> None:
        """Every rank checks the weights it holds (ZeRO-3: its partition); all ranks agree (a collective)."""
        finite = torch.ones((), device=self.worker.device)
        for p in self.engine.module.parameters():
            local = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps this rank's partition there
            finite = finite * torch.isfinite(local).all()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():  # a checkpoint waits for the device anyway
            raise DeterministicError(f"non-finite weights after step {step}: the update diverged; not checkpointed")

