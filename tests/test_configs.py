"""Every shipped config validates; the paper-scale recipes plan to fit on the cluster they name, and
their ZeRO stage and activation checkpointing are what `vitpipe plan` recommends there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from stages.train.params import PretrainParams
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# config -> (nodes, GPUs per node, expected parameter count from the paper's Table 1, in millions)
PAPER = {"vit-b16-i21k.yaml": (4, 8, 86), "vit-l16-i21k.yaml": (8, 8, 307), "vit-h14-s3.yaml": (16, 8, 632)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path: Path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_every_paper_recipe_is_shipped():
    assert set(PAPER) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_plans_and_fits(name: str, capsys):
    nodes, gpus, millions = PAPER[name]
    path = REPO / "configs" / name
    assert main(["plan", str(path), "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--gpu", "h100",
                 "--num-classes", "21843", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["stages"]["pretrain"]
    # The 21k-class head and pre-logits layer come on top of the backbone; Table 1's rounded counts
    # (L/16: 307M, our backbone 303.3M) include a head the paper does not specify, hence 1.5%.
    config = PretrainParams(**load_config(str(path)).stages["pretrain"].params)
    head = (config.representation_size + 1) * 21843 + (plan_width(name) + 1) * config.representation_size
    assert abs(plan["params"] - head - millions * 1e6) / (millions * 1e6) < 0.015, plan["params"]
    assert plan["fits"], plan["warnings"]
    assert config.workers == nodes * gpus  # the recipe's worker count is the cluster it names
    assert config.global_batch == 4096 and config.precision == "bf16" and config.use_gpu


def plan_width(name: str) -> int:
    return {"vit-b16-i21k.yaml": 768, "vit-l16-i21k.yaml": 1024, "vit-h14-s3.yaml": 1280}[name]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_follows_the_plans_recommendation(name: str, capsys):
    # Every training stage (pretrain and the fine-tunes) is planned on the world it runs on (its own
    # workers, 8 GPUs per node) and must be configured as the plan recommends.
    _, gpus, _ = PAPER[name]
    path = REPO / "configs" / name
    stages = {s: spec for s, spec in load_config(str(path)).stages.items() if spec.type in ("pretrain", "finetune")}
    assert "pretrain" in stages and len(stages) > 1
    checked = set()
    for world in sorted({spec.params["workers"] for spec in stages.values()}):
        assert world % gpus == 0, f"{world} workers do not fill {gpus}-GPU nodes"
        assert main(["plan", str(path), "--nodes", str(world // gpus), "--gpus-per-node", str(gpus), "--gpu", "h100",
                     "--num-classes", "21843", "--json"]) == 0
        plans = json.loads(capsys.readouterr().out)["stages"]
        for stage, spec in stages.items():
            if spec.params["workers"] != world:
                continue
            plan, rec = plans[stage], plans[stage]["recommended"]
            assert plan["cluster"]["world_size"] == world and plan["fits"], (stage, plan["warnings"])
            configured = (plan["zero_stage"], plan["checkpoint_activations"])
            assert configured == (rec["zero_stage"], rec["checkpoint_activations"]), (stage, rec["reason"])
            assert not any("the plan recommends" in n for n in plan["notes"])
            checked.add(stage)
    assert checked == set(stages)
