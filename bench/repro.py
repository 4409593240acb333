"""What makes trained weights differ between machines: CPU kernels and thread counts, measured.

Trains the same small ViT (the default pipeline's pretraining model: ViT-Ti/4 at 32 px, width 96)
for ``--steps`` AdamW steps on the same fixed batches of scikit-learn digits, from the same seed,
in fresh processes that differ in one setting each:

- ``repeat``: nothing (a second run of the baseline: are two runs on one machine identical?);
- ``threads=N``: ``torch.set_num_threads(N)`` instead of 1 (Ray gives each training worker
  ``OMP_NUM_THREADS`` = its CPUs, 1 in the default pipeline);
- ``isa=avx2`` / ``isa=default``: ATen's vectorised kernels built for AVX2 or scalar
  (``ATEN_CPU_CAPABILITY``), and oneDNN / MKL limited to AVX2 (``ONEDNN_MAX_CPU_ISA``,
  ``MKL_ENABLE_INSTRUCTIONS``): what another x86 CPU would run. ``default`` skips oneDNN/MKL limits.

For each variant: the largest absolute weight difference from the baseline, the final-loss
difference, and the step at which losses first differ. One JSON line; the baseline is a single
thread on this machine's best kernels (AVX-512 here).

    python bench/repro.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "repeat": {},
    "threads=2": {"REPRO_THREADS": "2"},
    "isa=avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "isa=default": {"ATEN_CPU_CAPABILITY": "default"},
}


def train_once(steps: int, out: Path) -> None:
    """Runs in a child process: the settings come from its environment."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from stages.model.vit import ViT, ViTConfig
    from stages.train.engine import param_groups

    torch.set_num_threads(int(os.environ.get("REPRO_THREADS", "1")))
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    model = ViT(ViTConfig(image_size=32, patch_size=4, width=96, depth=4, heads=3, mlp_dim=384, num_classes=10))
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    losses = []
    for step in range(steps):
        index = torch.arange(step * 64, step * 64 + 64) % len(labels)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    torch.save({"weights": model.state_dict(), "losses": torch.tensor(losses, dtype=torch.float64),
                "capability": torch.backends.cpu.get_cpu_capability()}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="AdamW steps per run (default 200)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        train_once(args.steps, Path(args.child))
        return

    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in VARIANTS.items():
            out = Path(tmp) / f"{name}.pt"
            child_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
            subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(out)],
                           env=child_env, check=True, cwd=Path(__file__).resolve().parents[1])
            results[name] = torch.load(out, weights_only=True)
    base = results["baseline"]
    report: dict[str, object] = {"bench": "repro", "steps": args.steps, "baseline_capability": base["capability"],
                                 "baseline_final_loss": round(float(base["losses"][-1]), 6)}
    for name, r in results.items():
        if name == "baseline":
            continue
        diffs = [float((r["weights"][k] - base["weights"][k]).abs().max()) for k in base["weights"]]
        differ = (r["losses"] != base["losses"]).nonzero()
        report[name] = {"capability": r["capability"], "max_weight_diff": max(diffs),
                        "final_loss_diff": float(r["losses"][-1] - base["losses"][-1]),
                        "first_differing_step": int(differ[0]) + 1 if len(differ) else None}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
