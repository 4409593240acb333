"""The default pipeline (`make pretrain`: configs/tiny.yaml) end to end, as a user runs it.

digits -> ingest -> pretrain (tiny ViT, 2 Ray workers, ZeRO-2) -> finetune at 48 px -> few-shot
-> report. One clean run is checked against the quality bar; a second run of the transfer stages
is SIGKILLed during finetune, resumed, and must end with the clean run's metrics exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, read_events_file, run_cli, start_cli, wait_for
from tests.test_resume import _kill_group

# The clean run (a module fixture, ~6 min on 2 idle cores) counts toward the first test's timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

CONFIG = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("default") / "tiny"
    result = run_cli("run", CONFIG, "--run-dir", str(run), "--no-dashboard", timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return run, result.stdout


def test_default_pipeline_meets_the_quality_bar(clean_run):
    run, stdout = clean_run
    metrics = json.loads((run / "metrics.json").read_text())
    top1, ten, one = (metrics["finetune.digits.top1"], metrics["fewshot.digits.10shot"],
                      metrics["fewshot.digits.1shot"])
    baseline = metrics["fewshot_random_init.digits.1shot"]
    assert top1 >= 0.93, metrics
    assert ten >= 0.90, metrics
    assert one - baseline >= 0.30, metrics
    assert {q["check"] for q in metrics["quality"]} == {"fine-tuned top-1", "10-shot accuracy",
                                                       "1-shot gain over random init"}
    assert all(q["passed"] for q in metrics["quality"])

    # The run ends by saying where the report is and the headline numbers.
    assert f"report: {run / 'report.html'}" in stdout
    assert f"fine-tuned top-1 on digits: {top1:.4f}" in stdout
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and "src='figures" not in page
    assert "Quality bar" in (run / "report.md").read_text()
    figures = {p.name for p in (run / "stages/report/figures").iterdir()}
    assert {"pretrain-curves.png", "pretrain-patch-components.png", "pretrain-position-similarity.png",
            "pretrain-attention-distance.png", "pretrain-attention-rollout.png", "finetune-curves.png"} <= figures
    # Fine-tuning ran at 48 px with the pretrained position embeddings resampled to a 12x12 grid.
    assert load_file(str(run / "stages/finetune/model.safetensors"))["pos_embed"].shape == (1, 145, 96)
    assert json.loads((run / "stages/finetune/eval.json").read_text())["total"] == 300


def test_sigkill_during_finetune_then_resume_matches_the_clean_run(clean_run, tmp_path):
    clean, _ = clean_run
    run = tmp_path / "killed"
    shutil.copytree(clean, run)  # ingest and pretrain are done; the transfer stages are not
    for stage in ("finetune", "fewshot", "report"):
        shutil.rmtree(run / "stages" / stage)
    for name in ("report.md", "report.html", "metrics.json"):
        (run / name).unlink()

    first_checkpoint = run / "stages/finetune/checkpoints/step-00000050/COMPLETE.json"
    proc = start_cli("resume", str(run), "--no-dashboard", log=tmp_path / "killed.log")
    try:
        wait_for(first_checkpoint.exists, timeout=900, interval=0.2, what="finetune's first checkpoint")
    finally:
        _kill_group(proc)
    assert not (run / "stages/finetune/manifest.json").exists(), "finetune finished before the kill"

    # Execution params changed on resume (a loader process per worker, a new retry budget and log
    # cadence) are not a config change: finetune continues from its checkpoint, with the same samples.
    resumed = run_cli("resume", str(run), "--no-dashboard", "finetune.loader_workers=1", "finetune.max_failures=3",
                      "finetune.log_every=10", timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from checkpoint step 50" in resumed.stderr  # finetune continued, it did not restart
    assert not (run / "stages/finetune.previous").exists()
    events = read_events_file(run / "events.jsonl")
    last = events[max(i for i, e in enumerate(events) if e["event"] == "run_started"):]
    skipped = {e["stage"] for e in last if e["event"] == "stage_skipped"}
    finished = {e["stage"] for e in last if e["event"] == "stage_finished"}
    assert {"ingest", "pretrain"} <= skipped and {"finetune", "report"} <= finished
    assert skipped | finished == {"ingest", "pretrain", "finetune", "fewshot", "report"}
    # fewshot does not depend on finetune: it may have finished before the kill, but never runs twice.
    ours = events[next(i for i, e in enumerate(events) if e["event"] == "run_started" and "killed" in e["uri"]):]
    assert sum(e["event"] == "stage_finished" and e["stage"] == "fewshot" for e in ours) == 1

    assert json.loads((run / "metrics.json").read_text()) == json.loads((clean / "metrics.json").read_text())
    a = load_file(str(clean / "stages/finetune/model.safetensors"))
    b = load_file(str(run / "stages/finetune/model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a), "the resumed fine-tune differs from the clean one"
