"""Weights to and from timm's ``VisionTransformer`` (timm 1.x), for ViTs and R50 hybrids.

Only names change; tensors are shared, not copied or transposed (both sides use ``nn.Linear``
and ``nn.Conv2d`` layouts). The mapping is strict both ways: a name that has no counterpart, a
missing name, or a shape that disagrees with the config raises ``ValueError`` naming it.

Semantics that must agree, and how a timm model has to be built for them to (``create_timm_model``
builds it so):

- pool "cls" = timm ``global_pool='token'`` with the class token;
- pool "gap" = timm ``class_token=False, global_pool='avg', fc_norm=False``: vitpipe normalises
  the tokens (final LayerNorm) and then averages them. timm's default for 'avg' (``fc_norm``)
  averages first and normalises after, which is a different function: such weights are refused;
- LayerNorm eps 1e-6, exact GELU, qkv with bias, no layer scale, no register tokens;
- the paper's pre-logits (tanh) layer has no module in timm 1.x: exporting a model that has one
  is refused; importing reads the legacy ``pre_logits.fc`` names of old timm checkpoints;
- hybrids: timm's ``ResNetV2(preact=False, stem_type='same')`` with ``StdConv2dSame(eps=1e-8)``
  convs and ``HybridEmbed`` (its ``vit_base_r50_s16_224`` is R50+B/16).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from stages.model.resnet import resnet_stride
from stages.model.vit import ViT, ViTConfig

__all__ = ["to_timm_state_dict", "from_timm_state_dict", "timm_model_kwargs", "create_timm_model"]

log = logging.getLogger(__name__)

# (vitpipe name, timm name) templates. {i}/{s}/{b}: block, stage and stage-block indices;
# {w}: weight or bias; {layer}: a bottleneck's conv1..3 / norm1..3.
_COMMON = [
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("blocks.{i}.norm1.{w}", "blocks.{i}.norm1.{w}"),
    ("blocks.{i}.attn.qkv.{w}", "blocks.{i}.attn.qkv.{w}"),
    ("blocks.{i}.attn.proj.{w}", "blocks.{i}.attn.proj.{w}"),
    ("blocks.{i}.norm2.{w}", "blocks.{i}.norm2.{w}"),
    ("blocks.{i}.fc1.{w}", "blocks.{i}.mlp.fc1.{w}"),
    ("blocks.{i}.fc2.{w}", "blocks.{i}.mlp.fc2.{w}"),
    ("norm.{w}", "norm.{w}"),
    ("head.{w}", "head.{w}"),
]
_PLAIN = [("patch_embed.{w}", "patch_embed.proj.{w}")]
_HYBRID = [
    ("patch_embed.proj.{w}", "patch_embed.proj.{w}"),
    ("patch_embed.backbone.stem_conv.weight", "patch_embed.backbone.stem.conv.weight"),
    ("patch_embed.backbone.stem_norm.{w}", "patch_embed.backbone.stem.norm.{w}"),
    ("patch_embed.backbone.stages.{s}.{b}.{layer}.{w}", "patch_embed.backbone.stages.{s}.blocks.{b}.{layer}.{w}"),
    ("patch_embed.backbone.stages.{s}.{b}.proj.weight",
     "patch_embed.backbone.stages.{s}.blocks.{b}.downsample.conv.weight"),
    ("patch_embed.backbone.stages.{s}.{b}.proj_norm.{w}",
     "patch_embed.backbone.stages.{s}.blocks.{b}.downsample.norm.{w}"),
]
# timm < 0.6 had the paper's pre-logits layer as ``pre_logits.fc`` (+ tanh); read-only support.
_LEGACY_PRE_LOGITS = [("pre_logits.0.{w}", "pre_logits.fc.{w}")]

_FIELDS = {"i": r"\d+", "s": r"\d+", "b": r"\d+", "w": "weight|bias", "layer": "(?:conv|norm)[123]"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for k, p in enumerate(parts))
    return re.compile(regex)


def _rules(pairs: list[tuple[str, str]], to_timm: bool) -> list[tuple[re.Pattern[str], str]]:
    return [(_compile(ours if to_timm else timm), timm if to_timm else ours) for ours, timm in pairs]


def _rename_all(state: Mapping[str, torch.Tensor], rules: list[tuple[re.Pattern[str], str]]
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply the first matching rule to each name; returns (renamed, names no rule matched)."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, template in rules:
            match = pattern.fullmatch(key)
            if match:
                out[template.format(**match.groupdict())] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def _is_hybrid(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("patch_embed.backbone.") for k in state)


def to_timm_state_dict(model_or_state: ViT | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitpipe ``ViT`` (or its state dict) -> a state dict for timm's ``VisionTransformer``.

    Load it into ``create_timm_model(cfg)`` (or a timm model built with ``timm_model_kwargs``).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    if any(k.startswith("pre_logits.") for k in state):
        raise ValueError("timm 1.x VisionTransformer has no pre-logits (representation_size) layer to hold this "
                         "model's; transfer it first (ViT.with_new_head) or export the backbone without the head")
    rules = _rules(_COMMON + (_HYBRID if _is_hybrid(state) else _PLAIN), to_timm=True)
    out, unknown = _rename_all(state, rules)
    if unknown:
        raise ValueError(f"no timm name for vitpipe parameter(s): {', '.join(sorted(unknown))}")
    return out


def _stage_depths(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Blocks per ResNet stage, from names ``patch_embed.backbone.stages.S.B.*`` (vitpipe naming)."""
    depth: dict[int, int] = {}
    for key in state:
        m = re.match(r"patch_embed\.backbone\.stages\.(\d+)\.(\d+)\.", key)
        if m:
            s, b = int(m[1]), int(m[2])
            depth[s] = max(depth.get(s, 0), b + 1)
    if sorted(depth) != list(range(len(depth))):
        raise ValueError(f"ResNet stages are not numbered 0..n-1: {sorted(depth)}")
    return tuple(depth[s] for s in range(len(depth)))


def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"timm state dict lacks {key!r} (after renaming to vitpipe names)")
    return state[key]


def _infer_fields(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The structural ViTConfig fields the weights determine (all but heads), from vitpipe names."""
    hybrid = _is_hybrid(state)
    proj = _need(state, "patch_embed.proj.weight" if hybrid else "patch_embed.weight")  # (D, C, P, P)
    width, patch = proj.shape[0], proj.shape[-1]
    pool = "cls" if "cls_token" in state else "gap"
    patches = _need(state, "pos_embed").shape[1] - (1 if pool == "cls" else 0)
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"{patches} patch position embeddings do not form a square grid")
    fields: dict[str, Any] = {
        "width": width, "patch_size": patch, "pool": pool,
        "depth": len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        "mlp_dim": _need(state, "blocks.0.fc1.weight").shape[0],
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "representation_size": state["pre_logits.0.weight"].shape[0] if "pre_logits.0.weight" in state else None,
    }
    if hybrid:
        layers = _stage_depths(state)
        fields.update(hybrid_layers=layers, channels=_need(state, "patch_embed.backbone.stem_conv.weight").shape[1],
                      image_size=grid * patch * resnet_stride(layers))
    else:
        fields.update(channels=proj.shape[1], image_size=grid * patch)
    return fields


def _check_against(cfg: ViTConfig, state: Mapping[str, torch.Tensor]) -> None:
    """Every name and shape of ``ViT(cfg)`` present in ``state`` and nothing else."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ViT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in set(expected) & set(state)
                   if tuple(state[k].shape) != expected[k])
    problems = [f"{what}: {', '.join(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
    if problems:
        raise ValueError("timm weights do not fit the vitpipe config; " + "; ".join(problems))


def from_timm_state_dict(state: Mapping[str, torch.Tensor], cfg: ViTConfig | None = None, *,
                         heads: int | None = None, global_pool: str | None = None
                         ) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """A timm ``VisionTransformer`` state dict -> (vitpipe config, state dict for ``ViT(cfg)``).

    The structure (width, depth, MLP, patch, image size, pool, classes, hybrid layers) is read
    from the weights. The number of heads is not in the weights: pass ``cfg`` or ``heads``. With
    ``cfg``, the weights must match it (its dropout and other training fields are kept). Pass the
    timm model's ``global_pool`` to have it checked: vitpipe has no class token + 'avg' variant.
    """
    state = dict(state)
    if any(k.startswith("fc_norm.") for k in state):
        raise ValueError("timm model normalises after pooling (fc_norm, timm's default for global_pool='avg'); "
                         "vitpipe's gap pools the normalised tokens: only fc_norm=False weights convert exactly")
    rules = _rules(_COMMON + _LEGACY_PRE_LOGITS + (_HYBRID if _is_hybrid(state) else _PLAIN), to_timm=False)
    ours, unknown = _rename_all(state, rules)
    if unknown:
        raise ValueError(f"no vitpipe name for timm parameter(s): {', '.join(sorted(unknown))}")
    fields = _infer_fields(ours)
    if global_pool is not None and global_pool != {"cls": "token", "gap": "avg"}[fields["pool"]]:
        raise ValueError(f"timm global_pool={global_pool!r} with class_token={fields['pool'] == 'cls'} has no "
                         "vitpipe equivalent: use 'token' with a class token, or 'avg' without one")
    if cfg is None:
        if heads is None:
            raise ValueError("the number of attention heads cannot be read from weights: pass heads= or cfg=")
        cfg = ViTConfig(heads=heads, **fields)
    else:
        if heads is not None and heads != cfg.heads:
            raise ValueError(f"heads={heads} disagrees with cfg.heads={cfg.heads}")
        diff = [f"{k}: weights {v!r}, cfg {getattr(cfg, k)!r}" for k, v in fields.items() if getattr(cfg, k) != v]
        if diff:
            raise ValueError("timm weights do not match cfg (" + "; ".join(diff) + "); for another resolution load "
                             "at the weights' image_size, then resample pos_embed")
    _check_against(cfg, ours)
    log.info("imported %d timm tensors as %s", len(ours), cfg)
    return cfg, ours


def timm_model_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` equivalent to ``cfg``.

    A hybrid also needs ``embed_layer`` (its ResNet); ``create_timm_model`` adds it.
    """
    if cfg.representation_size:
        raise ValueError("timm 1.x VisionTransformer has no pre-logits (representation_size) layer")
    mlp_ratio = cfg.mlp_dim / cfg.width
    if int(cfg.width * mlp_ratio) != cfg.mlp_dim:  # timm rebuilds the MLP width as int(width * ratio)
        raise ValueError(f"mlp_dim {cfg.mlp_dim} is not reproducible as timm's int(width * mlp_ratio)")
    return {
        "img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.channels,
        "num_classes": cfg.num_classes, "embed_dim": cfg.width, "depth": cfg.depth, "num_heads": cfg.heads,
        "mlp_ratio": mlp_ratio, "qkv_bias": True, "class_token": cfg.pool == "cls",
        "global_pool": "token" if cfg.pool == "cls" else "avg", "fc_norm": False,
        # vitpipe's one dropout rate covers embeddings, attention weights, and both residual branches.
        "pos_drop_rate": cfg.dropout, "attn_drop_rate": cfg.dropout, "proj_drop_rate": cfg.dropout,
        "drop_path_rate": cfg.drop_path,
    }


def create_timm_model(cfg: ViTConfig) -> nn.Module:
    """A freshly initialised timm ``VisionTransformer`` that ``to_timm_state_dict`` weights load into.

    Needs timm (a dev dependency of vitpipe); downloads nothing.
    """
    from functools import partial

    try:
        from timm.layers import HybridEmbed, StdConv2dSame
        from timm.models.resnetv2 import ResNetV2
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("create_timm_model needs timm (pip install timm)") from e
    kwargs = timm_model_kwargs(cfg)
    if cfg.hybrid_layers:
        backbone = ResNetV2(layers=list(cfg.hybrid_layers), num_classes=0, global_pool="", in_chans=cfg.channels,
                            preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8))
        kwargs["embed_layer"] = partial(HybridEmbed, backbone=backbone)
    return VisionTransformer(**kwargs)
