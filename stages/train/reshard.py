"""Resuming a checkpoint written by another number of workers, in-process, through DeepSpeed's
universal checkpoint form.

DeepSpeed cannot load ZeRO optimizer state partitioned for N ranks into M (``load_checkpoint``
refuses, and loading the module alone drops the Adam moments). Its universal form can: one folder
per parameter holding the full fp32 weights, ``exp_avg``, ``exp_avg_sq`` and the step, which an
engine built with ``checkpoint.load_universal`` slices for its own partition — ZeRO 1-3, fp32 or
bf16 (measured in ``../shared/notes/elastic-facts.md``). We use DeepSpeed's converter rather than a
form of our own: it is the one DeepSpeed's loader reads, and it is maintained with ZeRO's layout.
Plain fp32 data parallelism (ZeRO-0) saves whole state that any number of ranks loads as it is.

The resume, when the newest checkpoint's world size differs from this run's:

1. rank 0 makes the universal form of that checkpoint once, next to it
   (``checkpoints/step-N/universal/``, committed by its own ``COMPLETE.json`` after every file),
   from the checkpoint's files checked against their record; a later resume at yet another size
   reuses it;
2. each node fetches, once, the files its ranks load (one rank downloads them into the node's
   shared scratch), and every rank loads its own: under ZeRO 1-2 the parameters overlapping its
   slice of the flat master (~1/M of the form), under ZeRO-3 every parameter (each is split
   across all ranks: the whole form once per node);
3. the JSON parts come from the old ranks' files: new rank r carries the sample ledgers of old
   ranks r, r + M, ... (so the ledgers of all ranks still hold every sample consumed) and takes the
   global data cursor from the first of them (or old rank r mod N when it has none), so only new
   rank 0 reads old rank 0's file with the metrics history. There is no generator state to
   carry: dropout and stochastic depth are seeded per micro-batch slot, the same on any number of
   workers (``stages.train.step.mask_seed``).

SGD (the fine-tuning recipe): DeepSpeed's converter and its ZeRO-3 universal loader know Adam's
state by name only (``exp_avg``, ``exp_avg_sq``, ``step``; an SGD checkpoint fails with
``KeyError: 'exp_avg'``). SGD's one state tensor, the momentum buffer, has the shape and the
partitioning of the fp32 master weights, so the conversion reads it under Adam's first-moment name
(:func:`momentum_as_adam_state`, applied as the converter loads each file; the second moment and
the step are placeholders the ZeRO-3 loader insists on) and it is renamed back once loaded
(:func:`momentum_from_adam_state`). DeepSpeed's own slicing does the rest, for ZeRO 1-3.

Costs: one conversion (~the fp32 model plus moments written again: 7.6 GB at H/14; for SGD the
momentum is written twice, as both stand-ins) and the reads of step 2 (ZeRO-3 at H/14 on 16
nodes: 16 x 7.6 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import DeterministicError
from stages.train.checkpoint import COMPLETE, ROOT, CheckpointDamaged, CheckpointStore, step_name
from stages.train.context import WorkerContext
from stages.train.engine import weights_only_loads

__all__ = ["UNIVERSAL", "Reshard", "momentum_as_adam_state", "momentum_from_adam_state", "node_fetch_plan",
           "partitioned_optimizer_state", "reshard_step", "universal_form", "universal_files", "universal_params_loaded"]

log = logging.getLogger("vitpipe.train")

UNIVERSAL = "universal"  # the universal form's folder inside a checkpoint's folder (and its DeepSpeed tag)


@dataclass(frozen=True)
class Reshard:
    """The newest committed checkpoint was written by another number of workers than this run has."""

    step: int
    written_by: int
    universal: bool  # its optimizer state is partitioned: it loads through DeepSpeed's universal form
    record: dict[str, Any]  # its commit record (COMPLETE.json), read once


def partitioned_optimizer_state(zero_stage: int) -> bool:
    """Whether a checkpoint's optimizer state is split between the ranks that wrote it (ZeRO 1-3),
    and so needs the universal form on another world size. Without ZeRO, DeepSpeed saves whole,
    world-size-free state (fp32 and bf16 alike: measured with 0.19.8), which any number of ranks
    loads as it is."""
    return zero_stage > 0


MOMENTUM = "momentum_buffer"  # torch SGD's per-parameter state
_ADAM_NAMES = ("exp_avg", "exp_avg_sq", "step")  # what DeepSpeed's converter and ZeRO-3 loader read


def momentum_as_adam_state(loaded: Any) -> Any:
    """``loaded`` (what a checkpoint file held) with every SGD state in it — a dict holding a
    momentum buffer — also under Adam's names, for DeepSpeed's converter: the buffer as both
    moments (the second a placeholder, never loaded as such) and a zero step. Adam state and files
    without optimizer state pass unchanged."""
    if isinstance(loaded, dict):
        buffer = loaded.get(MOMENTUM)
        if torch.is_tensor(buffer) and "exp_avg" not in loaded:
            loaded.update(exp_avg=buffer, exp_avg_sq=buffer)
            loaded.setdefault("step", torch.zeros(()))
        for value in loaded.values():
            momentum_as_adam_state(value)
    elif isinstance(loaded, list | tuple):
        for value in loaded:
            momentum_as_adam_state(value)
    return loaded


def momentum_from_adam_state(optimizer: Any) -> None:
    """After a universal load into an SGD optimizer: the momentum came back under Adam's
    first-moment name (:func:`momentum_as_adam_state`); put it where SGD reads it and drop the
    placeholders. Adam optimizers are left alone."""
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps torch's optimizer
    if not isinstance(inner, torch.optim.SGD):
        return
    for state in inner.state.values():
        if "exp_avg" in state:
            state[MOMENTUM] = state["exp_avg"]
            for name in _ADAM_NAMES:
                state.pop(name, None)


def reshard_step(store: CheckpointStore, world_size: int, universal: bool) -> Reshard | None:
    """The resharding to do when the newest committed checkpoint was written by another number of
    workers than ``world_size``; None when there is nothing to resume or no resharding to do."""
    steps = store.steps()
    if not steps:
        return None
    record = store.record(steps[-1])
    written_by = record.get("world_size")
    if written_by is None or written_by == world_size:
        return None
    return Reshard(steps[-1], int(written_by), universal, record)


def universal_params_loaded(optimizer: Any) -> set[str] | None:
    """The parameters whose universal files this rank's engine reads; None: all of them.

    ZeRO 1 and 2 give each rank one contiguous slice of the flat fp32
    master: DeepSpeed's universal loader reads only the parameters overlapping it (those it
    linked, ``_hp_mapping``), about 1/M of the form. ZeRO-3 splits every parameter across all
    ranks, so each rank reads every parameter's files and keeps its slice."""
    groups = getattr(optimizer, "bit16_groups", None)
    names = getattr(optimizer, "param_names", None)
    params = [p for group in groups or [] for p in group]
    if names is None or not params or not all(hasattr(p, "_hp_mapping") for p in params):
        return None  # not ZeRO 1-2 as DeepSpeed 0.19 lays it out: fetch everything rather than guess
    return {names[p] for p in params if p._hp_mapping is not None}


def universal_form(store: CheckpointStore, node_store: CheckpointStore, step: int, written_by: int,
                   worker: WorkerContext, params: set[str] | None) -> Path:
    """A collective: rank 0 makes (or finds) the universal form of ``step``; then one rank per node
    fetches the files its node's ranks load (``params``: the parameters this rank reads, None for
    all) into ``node_store``'s folder, each checked against its record. Returns the local
    checkpoint folder holding it, which DeepSpeed loads with ``load_checkpoint(folder, tag=UNIVERSAL)``;
    the caller discards it once every rank has loaded."""
    error = None
    if worker.is_main:
        try:
            _ensure_universal(store, step, written_by)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, or they wait below forever
            error = " ".join(str(err).split()) or type(err).__name__
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise DeterministicError(f"checkpoint step {step}: cannot make its universal form: {verdict[0]}")
    needs: list[Any] = [None] * worker.world_size
    dist.all_gather_object(needs, (worker.node, None if params is None else sorted(params)))
    plan = node_fetch_plan([(node, None if wanted is None else set(wanted)) for node, wanted in needs])
    problem = None
    if worker.rank in plan:
        try:
            _fetch_universal(node_store, step, plan[worker.rank])
        except CheckpointDamaged as err:
            problem = str(err)
    problems: list[Any] = [None] * worker.world_size
    dist.all_gather_object(problems, problem)  # also: no rank loads before its node's files are there
    found = next((p for p in problems if p is not None), None)
    if found is not None:
        raise DeterministicError(f"checkpoint step {step}: its universal form is damaged: {found}; delete "
                                 f"{store.storage.uri_of(_prefix(step))} to have it made again")
    return node_store.local_dir(step)


def node_fetch_plan(needs: Sequence[tuple[str, set[str] | None]]) -> dict[int, set[str] | None]:
    """Who fetches which parameters' universal files: ``needs[r]`` is rank r's (node, parameters it
    loads; None: all). The lowest rank of each node fetches what the node's ranks load between
    them, once, into the node's shared folder — under ZeRO-3 every rank loads every parameter, so
    a node of 8 GPUs reads the form once instead of 8 times. Ranks absent from the plan fetch
    nothing."""
    plan: dict[int, set[str] | None] = {}
    first: dict[str, int] = {}
    for rank, (node, wanted) in enumerate(needs):
        fetcher = first.setdefault(node, rank)
        if fetcher == rank:
            plan[rank] = None if wanted is None else set(wanted)
        else:
            have = plan[fetcher]
            plan[fetcher] = None if have is None or wanted is None else have | wanted
    return plan


def universal_files(files: dict[str, Any], params: set[str] | None) -> dict[str, Any]:
    """Of the universal form's files, those a rank loading ``params`` reads: every per-parameter
    file (``zero/NAME/...``) of those parameters, and all files that are not per-parameter (the
    optimizer's global state, the model states)."""
    def wanted(rel: str) -> bool:
        parts = rel.split("/")
        return params is None or len(parts) < 3 or parts[0] != "zero" or parts[1] in params

    return {rel: meta for rel, meta in files.items() if wanted(rel)}


def _prefix(step: int) -> str:
    return f"{ROOT}/{step_name(step)}/{UNIVERSAL}"


def _ensure_universal(store: CheckpointStore, step: int, written_by: int) -> None:
    prefix = _prefix(step)
    if store.storage.exists(f"{prefix}/{COMPLETE}"):
        return
    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    record = store.record(step)
    store.check_listing(step, record)
    for rank in range(written_by):  # every file, checked against the record (downloaded when remote)
        source = store.fetch(step, rank, record)
    out = source / UNIVERSAL
    store.storage.delete_prefix(prefix)  # an attempt a crash cut short
    shutil.rmtree(out, ignore_errors=True)
    log.info("checkpoint step %d: converting it to DeepSpeed's universal form (written by %d workers)", step,
             written_by)
    chatter = io.StringIO()  # the converter prints a line per parameter
    # The converter unpickles the files: tensors and plain data only, SGD state shown as Adam's.
    with contextlib.redirect_stdout(chatter), weights_only_loads(momentum_as_adam_state):
        to_universal(argparse.Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                                        num_merge_workers=1, keep_temp_folder=False, strict=True,
                                        inject_missing_state=True))
    (source / "latest_universal").unlink(missing_ok=True)  # the converter's pointer file: not ours
    files = store.publish_files(out, [p for p in out.rglob("*") if p.is_file()], prefix)
    store.storage.write_text(f"{prefix}/{COMPLETE}", json.dumps({"step": step, "files": files}, indent=1,
                                                                 sort_keys=True))


def _fetch_universal(store: CheckpointStore, step: int, params: set[str] | None) -> None:
    prefix = _prefix(step)
    record = json.loads(store.storage.read_text(f"{prefix}/{COMPLETE}"))
    store.fetch_files(prefix, store.local_dir(step) / UNIVERSAL, universal_files(record["files"], params))
