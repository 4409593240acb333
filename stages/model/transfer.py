"""From a pretrained handoff to a transfer model (the paper's fine-tuning recipe, §3.2).

"We remove the pre-trained prediction head and attach a zero-initialized D x K feedforward layer"
and "perform 2D interpolation of the pre-trained position embeddings" for the new resolution.
Like big_vision's ``dont_load=["head/kernel", "head/bias"]``, the pretraining head (and its
pre-logits layer) is simply not loaded; everything else must match exactly.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from stages.model.posemb import resample_pos_embed
from stages.model.vit import ViT, ViTConfig

__all__ = ["HEAD_PREFIXES", "transfer_config", "transfer_state_dict", "load_transferred", "build_transfer_model"]

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("head.", "pre_logits.")


def transfer_config(source: ViTConfig, image_size: int, num_classes: int, **changes: Any) -> ViTConfig:
    """The fine-tuning config: same backbone, new resolution, plain linear head for K classes."""
    return replace(source, image_size=image_size, num_classes=num_classes, representation_size=None, **changes)


def transfer_state_dict(state: dict[str, torch.Tensor], source: ViTConfig,
                        target: ViTConfig) -> dict[str, torch.Tensor]:
    """Pretrained weights for ``target``: head dropped, position embeddings resampled to its grid."""
    out = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    if "pos_embed" not in out:
        raise ValueError("pretrained weights have no pos_embed")
    if source.grid != target.grid:
        prefix = 1 if source.pool == "cls" else 0
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], target.grid, num_prefix_tokens=prefix)
        log.info("resampled position embeddings from a %dx%d to a %dx%d grid",
                 source.grid, source.grid, target.grid, target.grid)
    return out


def load_transferred(model: ViT, source: ViTConfig, state: dict[str, torch.Tensor]) -> None:
    """Load pretrained ``state`` (of ``source``) into ``model``: every backbone weight must fit
    exactly (strict, but for the pretraining head, which is not loaded); position embeddings are
    resampled to the model's grid."""
    missing, unexpected = model.load_state_dict(transfer_state_dict(state, source, model.cfg), strict=False)
    missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f"pretrained weights do not fit the model: missing {missing}, unexpected {unexpected}")


def build_transfer_model(source: ViTConfig, state: dict[str, torch.Tensor], image_size: int,
                         num_classes: int, **changes: Any) -> ViT:
    """A ViT for the downstream task, with every backbone weight loaded and a zero head."""
    model = ViT(transfer_config(source, image_size, num_classes, **changes))
    load_transferred(model, source, state)
    return model
