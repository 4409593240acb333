"""The handoff between stages: a consolidated model as ``model.safetensors`` + ``model_config.json``.

One module writes it (the training stages) and reads it back (finetune, fewshot, report), so the
format lives in one place. Reading downloads both files, checks each against the sha256 the
producing stage committed in its manifest, and only then parses them — a half-uploaded or
swapped file is an error naming the file, never a silently different model. No pickle is
involved: safetensors and JSON only.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import VitpipeError
from pipeline.storage import Storage, open_storage, sha256_stream
from stages.model.vit import ViTConfig

__all__ = ["WEIGHTS", "CONFIG", "HANDOFF_FILES", "HandoffRef", "Handoff", "save_handoff", "read_handoff"]

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
HANDOFF_FILES = (WEIGHTS, CONFIG)


@dataclass(frozen=True)
class HandoffRef:
    """Where a handoff lives (the producing stage's folder) and the sha256 of each file, from its manifest."""

    uri: str
    sha256: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [name for name in HANDOFF_FILES if name not in self.sha256]
        if missing:
            raise ValueError(f"handoff at {self.uri} records no checksum for {', '.join(missing)}")


@dataclass(frozen=True)
class Handoff:
    config: ViTConfig
    state: dict[str, torch.Tensor]


def save_handoff(storage: Storage, config: ViTConfig, state: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write the weights (contiguous CPU tensors) and the model config into ``storage``."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS
        save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
        storage.upload_file(path, WEIGHTS)
    storage.write_text(CONFIG, json.dumps(config.to_dict(), indent=2, sort_keys=True))


def read_handoff(ref: HandoffRef, settings: Any = None) -> Handoff:
    """Download, verify against the manifest's sha256, then load."""
    from safetensors.torch import load_file

    source = open_storage(ref.uri, settings)
    with tempfile.TemporaryDirectory() as tmp:
        for name in HANDOFF_FILES:
            local = Path(tmp) / name
            source.download_file(name, local)
            with open(local, "rb") as f:
                digest, _ = sha256_stream(f)
            if digest != ref.sha256[name]:
                raise VitpipeError(f"handoff {source.uri_of(name)} does not match the sha256 its stage committed; "
                                   "re-run that stage")
        config = ViTConfig(**json.loads((Path(tmp) / CONFIG).read_text()))
        return Handoff(config, load_file(str(Path(tmp) / WEIGHTS)))
