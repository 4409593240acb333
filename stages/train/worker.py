"""The training loop each Ray Train worker runs: DeepSpeed ZeRO around the single-device ViT.

Resume is exact: a checkpoint holds DeepSpeed's model/optimizer state for every rank, each rank's
loader position and RNG state, and (optionally) the ledger of sample keys consumed so far. After
a worker fault Ray Train restarts the worker group, and this loop continues from the newest
complete checkpoint; `vitpipe resume` after a driver fault does the same.

The same loop fine-tunes (``config["init"]``: start from a pretrain handoff with the head
replaced and position embeddings resampled; ``config["optimizer"]["name"] == "sgd"``) and then
evaluates top-1 on held-out shards (``config["eval_shards"]``), each rank a disjoint subset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["train_loop"]

log = logging.getLogger("vitpipe.train")


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    # Weight decay on matrices and filters only; biases, norms, position embeddings and the
    # class token stay undecayed (as in big_vision and timm).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        undecayed = p.ndim < 2 or name.endswith(("pos_embed", "cls_token"))  # cls_token is (1, 1, D)
        (no_decay if undecayed else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _build_optimizer(model: Any, opt: dict[str, Any]) -> Any:
    import torch

    if opt["name"] == "sgd":  # the paper's fine-tuning optimiser: momentum 0.9, no weight decay
        return torch.optim.SGD(model.parameters(), lr=opt["lr"], momentum=opt["momentum"], weight_decay=0.0)
    return torch.optim.AdamW(_param_groups(model, opt["weight_decay"]), lr=opt["lr"], betas=tuple(opt["betas"]),
                             eps=1e-8)


def _load_initial_weights(model: Any, init: dict[str, Any], settings: Any) -> None:
    """Fine-tuning: the pretrain handoff, head dropped, position embeddings resampled."""
    from pipeline.storage import open_storage
    from stages.model.transfer import HEAD_PREFIXES, load_handoff, transfer_state_dict

    source = open_storage(init["uri"], settings)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("model.safetensors", "model_config.json"):
            source.download_file(name, Path(tmp) / name)
        source_cfg, state = load_handoff(tmp)
    missing, unexpected = model.load_state_dict(transfer_state_dict(state, source_cfg, model.cfg), strict=False)
    missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if missing or unexpected:
        from pipeline.errors import VitpipeError

        raise VitpipeError(f"pretrained weights do not fit the model: missing {missing}, unexpected {unexpected}")


def _upload_tree(local: Path, out: Any, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            out.upload_file(path, f"{prefix}/{path.relative_to(local).as_posix()}")


def _evaluate(model: Any, config: dict[str, Any], settings: Any, rank: int, world: int) -> dict[str, Any]:
    """Top-1 over every held-out sample exactly once: each rank takes whole shards, counts are summed."""
    import torch
    import torch.distributed as dist

    from pipeline.storage import open_storage
    from stages.data.evalset import iter_eval_batches, split_shards
    from stages.data.loader import ShardInfo

    shards = split_shards([ShardInfo(**s) for s in config["eval_shards"]], rank, world)
    skipped: list[dict[str, str]] = []
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for batch in iter_eval_batches(open_storage(config["data_uri"], settings), shards, config["micro_batch"],
                                       model.cfg.image_size, skipped=skipped):
            correct += int((model(batch["image"]).argmax(-1) == batch["label"]).sum())
            total += len(batch["key"])
    counts = torch.tensor([correct, total, len(skipped)], dtype=torch.int64)
    dist.all_reduce(counts)
    correct, total, n_skipped = (int(c) for c in counts)
    return {"split": config["eval_split"], "top1": correct / total if total else None, "correct": correct,
            "total": total, "skipped": n_skipped}


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate()[1], "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate((3, tuple(state["python"]), None))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def train_loop(config: dict[str, Any]) -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.config import StorageSettings
    from pipeline.errors import VitpipeError
    from pipeline.stage import Progress
    from pipeline.storage import open_storage
    from stages.data.loader import ShardInfo, ShardLoader
    from stages.model.vit import ViT, ViTConfig, flops_per_image
    from stages.train.checkpoint import CheckpointStore
    from stages.train.schedule import lr_at
    from stages.train.timing import eta_seconds, format_duration

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    settings = StorageSettings(**config["storage"])
    out = open_storage(config["out_uri"], settings)
    store = CheckpointStore(out, Path(config["staging"]) / f"rank{rank}")

    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    random.seed(config["seed"] + rank)
    model_cfg = ViTConfig(**config["model"])
    model = ViT(model_cfg)
    if config.get("init"):
        _load_initial_weights(model, config["init"], settings)
    torch.manual_seed(config["seed"] * 1000 + rank + 1)  # per-rank dropout / drop-path masks
    optimizer = _build_optimizer(model, {**config["optimizer"], "lr": config["lr"]})
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config["deepspeed"])
    bf16 = config["deepspeed"]["bf16"]["enabled"]

    # Where each rank runs (node, host, pid): recorded so placement is auditable (one worker per node).
    placement: list[Any] = [None] * world
    dist.all_gather_object(placement, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                       "hostname": socket.gethostname(), "pid": os.getpid()})
    if rank == 0:
        out.write_text("workers.json", json.dumps(placement, indent=2))

    loader = ShardLoader(open_storage(config["data_uri"], settings), [ShardInfo(**s) for s in config["shards"]],
                         batch_size=config["micro_batch"], image_size=model_cfg.image_size, train=True,
                         seed=config["seed"], rank=rank, world_size=world, num_workers=config["loader_workers"],
                         crop_scale=tuple(config["crop_scale"]), hflip=config.get("hflip", True))
    step, ledger, history = 0, [], []
    latest = store.latest()
    if latest is not None:
        ckpt = store.fetch(latest)
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=True)
        loader.load_state_dict(json.loads((ckpt / f"loader-rank{rank}.json").read_text()))
        extra = json.loads((ckpt / f"state-rank{rank}.json").read_text())
        _set_rng_state(extra["rng"])
        ledger = extra.get("ledger", [])
        history = [m for m in extra.get("history", []) if m["step"] <= latest]
        step = latest
        log.info("rank %d: resumed from checkpoint step %d", rank, step)

    total, accum = config["steps"], config["deepspeed"]["gradient_accumulation_steps"]
    flops = flops_per_image(model_cfg, training=True)
    label = config.get("label", "train")
    writer, tb_dir, progress = None, Path(config["staging"]) / "tensorboard", None
    if rank == 0:
        if config.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops events a crashed attempt logged after its checkpoint.
            writer = SummaryWriter(log_dir=str(tb_dir), purge_step=step + 1 if step else None)
        if config.get("show_progress"):  # a bar on a terminal; otherwise the step log lines carry the ETA
            progress = Progress(total, label, True, log)
            progress.update(step)
    attempt_start, attempt_first_step = time.perf_counter(), step
    batches = iter(loader)

    def next_batch() -> dict[str, Any]:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # epoch boundary
            batches = iter(loader)
            return next(batches)

    def save(at: int) -> None:
        ckpt = store.local_dir(at)
        engine.save_checkpoint(str(ckpt.parent), tag=ckpt.name, save_latest=False)
        (ckpt / f"loader-rank{rank}.json").write_text(json.dumps(loader.state_dict()))
        state = {"rng": _rng_state(), "history": history if rank == 0 else []}
        if config["ledger"]:
            state["ledger"] = ledger
        (ckpt / f"state-rank{rank}.json").write_text(json.dumps(state))
        dist.barrier()  # every rank's files are on disk (DeepSpeed writes some after its own barrier)
        mine = store.publish(at, rank)
        listings: list[Any] = [None] * world
        dist.all_gather_object(listings, mine)
        if rank == 0:
            store.commit(at, {rel: meta for listing in listings for rel, meta in listing.items()})
            # DeepSpeed drops its recovery scripts (which unpickle checkpoints) beside every save;
            # the handoff is safetensors, so they are not kept among the stage's outputs.
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (ckpt.parent / script).unlink(missing_ok=True)
            store.prune(config["keep_checkpoints"])
            out.write_text("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
            if writer is not None:
                writer.flush()
                _upload_tree(tb_dir, out, "tensorboard")
        dist.barrier()

    while step < total:
        lr = lr_at(step, config["lr"], total, config["warmup_steps"], config["decay"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        started, waited, loss_sum = time.perf_counter(), 0.0, 0.0
        for _ in range(accum):
            t = time.perf_counter()
            batch = next_batch()
            waited += time.perf_counter() - t
            if config["ledger"]:
                ledger.extend(batch["key"])
            images = batch["image"].to(engine.device)
            images = images.to(torch.bfloat16) if bf16 else images
            loss = F.cross_entropy(engine(images).float(), batch["label"].to(engine.device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
        step += 1
        mean_loss = torch.tensor([loss_sum / accum])
        dist.all_reduce(mean_loss)
        mean_loss = float(mean_loss) / world
        if not math.isfinite(mean_loss):
            raise VitpipeError(f"non-finite loss ({mean_loss}) at step {step}")
        seconds = time.perf_counter() - started
        images_per_s = config["global_batch"] / seconds
        grad_norm = engine.get_global_grad_norm()
        # Without fp16 loss scaling an inf/nan gradient is divergence, not a scale to back off from;
        # DeepSpeed would silently skip every such step, so stop instead.
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise VitpipeError(f"non-finite gradient norm ({float(grad_norm)}) at step {step} (loss {mean_loss:.4g})")
        record = {"step": step, "loss": round(mean_loss, 6), "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "images_per_s": round(images_per_s, 2), "step_time_s": round(seconds, 4),
                  "data_wait_fraction": round(waited / seconds, 4),
                  "mfu": round(images_per_s * flops / config["peak_flops"], 6) if config["peak_flops"] else None,
                  "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available()
                  else None, "epoch": loader.epoch}
        if rank == 0:
            history.append(record)
            if writer is not None:
                for key in ("loss", "lr", "grad_norm", "images_per_s", "step_time_s", "data_wait_fraction", "mfu",
                            "max_memory_gb"):
                    if record[key] is not None:
                        writer.add_scalar(f"{label}/{key}", record[key], step)
            if progress is not None:
                progress.update(1)
            if step % config["log_every"] == 0 or step == total:
                eta = eta_seconds(step - attempt_first_step, total - attempt_first_step,
                                  time.perf_counter() - attempt_start)
                log.info("%s step %d/%d loss %.4f lr %.2e %.1f img/s, ETA %s", label, step, total, mean_loss, lr,
                         images_per_s, format_duration(eta))
        if step % config["checkpoint_every"] == 0 or step == total:
            save(step)

    # Handoff: full fp32 weights, gathered from the ZeRO shards (a collective on every rank).
    state = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None when there is no ZeRO fp32 master (ZeRO-0, fp32)
        state[name] = (full if full is not None else p).detach().float().cpu().contiguous()
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
        _upload_tree(tb_dir, out, "tensorboard")
    if config["ledger"]:
        out.write_text(f"ledger/rank{rank}.json", json.dumps(ledger))
    if config.get("eval_shards"):
        # Evaluate the consolidated fp32 weights in a plain local model: no ZeRO collectives, so
        # ranks may see different numbers of batches.
        local = ViT(model_cfg)
        local.load_state_dict(state)
        result = _evaluate(local, config, settings, rank, world)
        if rank == 0:
            out.write_text("eval.json", json.dumps(result, indent=2, sort_keys=True))
            log.info("%s: top-1 %.4f on %d %s samples (%d skipped)", label, result["top1"] or 0.0, result["total"],
                     result["split"], result["skipped"])
    if rank == 0:
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            save_file(state, str(path), metadata={"format": "pt", "step": str(step)})
            out.upload_file(path, "model.safetensors")
        out.write_text("model_config.json", json.dumps(model_cfg.to_dict(), indent=2, sort_keys=True))
    dist.barrier()
