"""The Vision Transformer (Dosovitskiy et al., 2020), single-device.

Patches -> linear embedding (a strided conv) -> [class token] + learned 1-D position embeddings
-> pre-norm encoder blocks (LayerNorm -> multi-head self-attention -> residual, LayerNorm -> MLP
with GELU -> residual) -> final LayerNorm -> class-token state (or global average pool) ->
head. Pretraining uses the paper's MLP head with one tanh "pre-logits" layer; transfer uses a
plain linear head. ZeRO, Ray placement and compilation wrap this module from outside.

Hybrid (paper §3.1): with ``hybrid_layers`` set, the patches come from the feature map of a
ResNet (``stages.model.resnet``) instead of the raw image; ``patch_size`` is then the patch size
*on that feature map* (1 for R50+ViT-B/16), and one token covers ``effective_patch_size`` =
``patch_size`` x the ResNet's stride pixels per side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.model.resnet import ResNet, count_resnet_params, resnet_flops, resnet_out_channels, resnet_stride

__all__ = ["VARIANTS", "HYBRID_BACKBONES", "ViTConfig", "decode_variant", "HybridEmbed", "ViT", "count_params",
           "flops_per_image"]

# name -> (depth, width D, MLP dim, heads); paper Table 1, Ti/S/g from later ViT papers.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
    "g": (40, 1408, 6144, 16),
}

# (ResNet name, effective patch size) -> ResNet blocks per stage, for "R50+B/16"-style names. The
# paper's R50+ViT-B/16 drops stage 4 and gives stage 3 nine blocks (output stride 16); the /32
# hybrids keep all four stages (stride 32). The ViT then takes 1x1 patches of the feature map.
HYBRID_BACKBONES: dict[tuple[str, int], tuple[int, ...]] = {
    ("R50", 16): (3, 4, 9),
    ("R50", 32): (3, 4, 6, 3),
    ("R26", 32): (2, 2, 2, 2),
}


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    heads: int = 12
    num_classes: int = 1000
    channels: int = 3
    pool: Literal["cls", "gap"] = "cls"
    representation_size: int | None = None  # pre-logits (tanh) layer of the pretraining head
    dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth, linearly increasing over depth
    checkpoint_activations: bool = False
    # ResNet blocks per stage for a hybrid (e.g. (3, 4, 9)); None: patches of the raw image.
    hybrid_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.hybrid_layers is not None:
            # A config read back from JSON carries a list; store a tuple so configs stay hashable and equal.
            layers = tuple(self.hybrid_layers)
            if not 1 <= len(layers) <= 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
                raise ValueError(f"hybrid_layers must be 1 to 4 positive block counts, got {self.hybrid_layers!r}")
            object.__setattr__(self, "hybrid_layers", layers)
        if self.image_size % self.effective_patch_size:
            where = f" x ResNet stride {self.backbone_stride} = {self.effective_patch_size}" if self.hybrid_layers \
                else ""
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}{where}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")

    @property
    def backbone_stride(self) -> int:
        """Pixels per feature-map cell of the hybrid's ResNet (1 for a plain ViT)."""
        return resnet_stride(self.hybrid_layers) if self.hybrid_layers else 1

    @property
    def effective_patch_size(self) -> int:
        """Pixels per token along each side: ``patch_size``, times the ResNet's stride for a hybrid."""
        return self.patch_size * self.backbone_stride

    @property
    def embed_channels(self) -> int:
        """Channels the patch projection sees: the image's, or the hybrid ResNet's output channels."""
        return resnet_out_channels(self.hybrid_layers) if self.hybrid_layers else self.channels

    @property
    def grid(self) -> int:
        return self.image_size // self.effective_patch_size

    @property
    def tokens(self) -> int:
        return self.grid**2 + (1 if self.pool == "cls" else 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types; ``ViTConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg``."""
        d = asdict(self)
        if d["hybrid_layers"] is None:
            # Left out for plain ViTs, so their config JSON reads as before (and in older code).
            del d["hybrid_layers"]
        else:
            d["hybrid_layers"] = list(d["hybrid_layers"])
        return d


def decode_variant(name: str, **overrides: Any) -> ViTConfig:
    """``"B/16"`` -> the ViT-B/16 config (like big_vision's ``decode_variant``).

    ``"R50+B/16"`` -> the hybrid: a ResNet-50 cut to output stride 16 (layers (3, 4, 9)) and a
    ViT-B on 1x1 patches of its feature map; see ``HYBRID_BACKBONES`` for the known pairs.
    """
    backbone, plus, vit = name.rpartition("+")
    size, sep, patch = vit.partition("/")
    if size not in VARIANTS or not sep or not patch.isdigit():
        raise ValueError(f"unknown ViT variant {name!r}: expected [RESNET+]SIZE/PATCH with SIZE in "
                         f"{', '.join(VARIANTS)}")
    depth, width, mlp, heads = VARIANTS[size]
    fields: dict[str, Any] = {"patch_size": int(patch), "width": width, "depth": depth, "mlp_dim": mlp,
                              "heads": heads}
    if plus:
        layers = HYBRID_BACKBONES.get((backbone, int(patch)))
        if layers is None:
            known = ", ".join(f"{r}+SIZE/{p}" for r, p in HYBRID_BACKBONES)
            raise ValueError(f"unknown hybrid variant {name!r}: known are {known}")
        assert resnet_stride(layers) == int(patch), (layers, patch)
        fields.update(patch_size=1, hybrid_layers=layers)  # the ResNet's stride is the effective patch
    return ViTConfig(**{**fields, **overrides})


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = drop_path

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep) / keep  # per-sample stochastic depth
            branch = branch * mask
        return x + branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.dropout(self.attn(self.norm1(x))))
        mlp = self.fc2(self.dropout(F.gelu(self.fc1(self.norm2(x)))))
        return self._residual(x, self.dropout(mlp))


class HybridEmbed(nn.Module):
    """Hybrid patch embedding: ResNet feature map -> patches of ``patch_size`` cells -> width D."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        assert cfg.hybrid_layers, "HybridEmbed needs cfg.hybrid_layers"
        self.backbone = ResNet(cfg.hybrid_layers, cfg.channels, checkpoint_activations=cfg.checkpoint_activations)
        self.proj = nn.Conv2d(self.backbone.out_channels, cfg.width, kernel_size=cfg.patch_size,
                              stride=cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(images))  # (B, D, H/16, W/16) for R50+B/16


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # A plain ViT keeps its patch embedding a bare conv, so its parameter names stay "patch_embed.weight/bias".
        self.patch_embed: nn.Module = HybridEmbed(cfg) if cfg.hybrid_layers else \
            nn.Conv2d(cfg.channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.tokens, cfg.width))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        if cfg.representation_size:
            self.pre_logits: nn.Module = nn.Sequential(nn.Linear(cfg.width, cfg.representation_size), nn.Tanh())
            head_in = cfg.representation_size
        else:
            self.pre_logits = nn.Identity()
            head_in = cfg.width
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # big_vision's init: trunc-normal(0.02) position embeddings, zero class token, Xavier
        # for linear layers with small-normal biases in the MLP, LeCun-normal patch embedding.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        proj = self.patch_proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(proj.bias)
        if isinstance(self.patch_embed, HybridEmbed):
            self.patch_embed.backbone.reset_parameters()
        for block in self.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.fc1, block.fc2):
                nn.init.xavier_uniform_(layer.weight)
            for layer in (block.attn.qkv, block.attn.proj):
                nn.init.zeros_(layer.bias)
            for layer in (block.fc1, block.fc2):
                nn.init.normal_(layer.bias, std=1e-6)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)  # the paper's zero-initialised head
            nn.init.zeros_(self.head.bias)

    @property
    def patch_proj(self) -> nn.Conv2d:
        """The conv mapping patches to width D (of the image, or of the hybrid's ResNet features)."""
        return self.patch_embed.proj if isinstance(self.patch_embed, HybridEmbed) else self.patch_embed

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> encoded tokens (B, T, D), after the final LayerNorm."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"input gives {x.shape[1]} tokens, position embeddings have {self.pos_embed.shape[1]}: "
                             "resample them with resample_pos_embed for a new resolution")
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.cfg.checkpoint_activations and self.training \
                else block(x)
        return self.norm(x)

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay must not touch (timm's hook; here the whole list, so the
        optimiser needs no rule of its own): biases and norm scales (1-D), the position
        embeddings and the class token, whose (1, 1, D) shape looks like a matrix but is not one."""
        skip = {name for name, p in self.named_parameters() if p.ndim < 2}
        skip.add("pos_embed")
        if self.cls_token is not None:
            skip.add("cls_token")
        return skip

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        """The image representation y (class-token state, or mean of patch tokens), before the head."""
        x = self.tokens(images)
        return x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(self.representation(images)))

    def with_new_head(self, num_classes: int) -> ViT:
        """Transfer: drop the pretraining head (and pre-logits), attach a zero-initialised linear head."""
        self.cfg = replace(self.cfg, num_classes=num_classes, representation_size=None)
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.cfg.width, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        return self


def count_params(cfg: ViTConfig) -> int:
    """Closed-form parameter count (checked against the module in tests)."""
    D, L, M, P, C = cfg.width, cfg.depth, cfg.mlp_dim, cfg.patch_size, cfg.embed_channels
    embed = C * P * P * D + D + cfg.tokens * D + (D if cfg.pool == "cls" else 0)
    if cfg.hybrid_layers:
        embed += count_resnet_params(cfg.hybrid_layers, cfg.channels)
    block = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * M + M) + (M * D + D)
    head_in = cfg.representation_size or D
    pre_logits = (D * cfg.representation_size + cfg.representation_size) if cfg.representation_size else 0
    head = head_in * cfg.num_classes + cfg.num_classes if cfg.num_classes > 0 else 0
    return embed + L * block + 2 * D + pre_logits + head


def flops_per_image(cfg: ViTConfig, training: bool = False) -> int:
    """Forward FLOPs (2 per multiply-add) for one image; x3 for a training step (fwd + bwd).

    Matrix multiplies and convolutions only (a hybrid's ResNet convs included); norms,
    activations, softmax and pooling are left out, as FLOP counters usually do.
    """
    D, L, M, T = cfg.width, cfg.depth, cfg.mlp_dim, cfg.tokens
    patches = cfg.grid**2
    embed = 2 * patches * cfg.embed_channels * cfg.patch_size**2 * D
    if cfg.hybrid_layers:
        embed += resnet_flops(cfg.hybrid_layers, cfg.image_size, cfg.channels)
    attn = 2 * T * D * 3 * D + 2 * T * T * D * 2 + 2 * T * D * D  # qkv, QK^T and AV, output projection
    mlp = 2 * T * D * M * 2
    head_in = cfg.representation_size or D
    head = (2 * D * cfg.representation_size if cfg.representation_size else 0) + 2 * head_in * max(cfg.num_classes, 0)
    forward = embed + L * (attn + mlp) + head
    return 3 * forward if training else forward
