"""The default pipeline (`make pretrain`: configs/tiny.yaml) end to end, as a user runs it.

digits -> ingest -> pretrain (tiny ViT, 2 Ray workers, ZeRO-2) -> finetune at 48 px -> few-shot
-> report. One clean run is checked against the quality bar; a second run of the transfer stages
is SIGKILLed during finetune, resumed, and must end with the clean run's metrics exactly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env, read_events_file, run_cli, start_cli, wait_for
from tests.test_resume import _kill_group

# The clean run (a module fixture, ~6 min on 2 idle cores) counts toward the first test's timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

CONFIG = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def trackers(tmp_path_factory) -> Path:
    """Where the runs' MLflow store (sqlite) and W&B files (offline) go; W&B's own folders too."""
    return tmp_path_factory.mktemp("trackers")


def tracked_env(trackers: Path) -> dict[str, str]:
    """Offline: W&B writes local files only, MLflow's usage telemetry is off (nothing leaves the machine)."""
    return cli_env(WANDB_MODE="offline", MLFLOW_DISABLE_TELEMETRY="true", NETRC=str(trackers / "netrc"),
                   **{name: str(trackers / name.lower()) for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                                     "WANDB_DATA_DIR")})


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, trackers) -> tuple[Path, str, str]:
    run = tmp_path_factory.mktemp("default") / "tiny"
    result = run_cli("run", CONFIG, "--run-dir", str(run), "--no-dashboard",
                     f"tracking.mlflow.tracking_uri=sqlite:///{trackers}/mlflow.db", "tracking.wandb.mode=offline",
                     f"tracking.wandb.dir={trackers}/wandb", timeout=1800, env=tracked_env(trackers))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return run, result.stdout, result.stderr


def mlflow_steps(trackers: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(f"sqlite:///{trackers}/mlflow.db").get_metric_history(
        run_id, key))


def losses(stage: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())]


def test_default_pipeline_meets_the_quality_bar(clean_run):
    run, stdout, _ = clean_run
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
    # Where the training stages' time went: in the metrics, the report and the headline.
    assert 0 < metrics["pretrain.pretrain.goodput"] < 1 and 0 < metrics["finetune.digits.goodput"] < 1
    assert "## Goodput" in (run / "report.md").read_text() and "goodput.png" in figures
    assert "training goodput: pretrain " in stdout


def test_the_default_console_is_quiet_and_the_log_file_keeps_everything(clean_run):
    run, stdout, stderr = clean_run
    noisy = [line for line in (stdout + stderr).splitlines()
             if re.search(r"(?i)warning|traceback|core_worker|untested optimizer", line)]
    assert not noisy, noisy
    # Ray's and DeepSpeed's lines kept off the console are in the run's log file.
    (log_file,) = (run / "logs").glob("driver-*.log")
    kept = log_file.read_text()
    assert "PreemptionWatcher" in kept and "untested optimizer" in kept and "pretrain step 600/600" in kept


def test_the_run_is_one_mlflow_run_and_one_wandb_run(clean_run, trackers, monkeypatch):
    from mlflow import MlflowClient

    from tests.test_trackers import wandb_items, wandb_records

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    run, _, _ = clean_run
    ids = json.loads((run / "tracking.json").read_text())
    client = MlflowClient(f"sqlite:///{trackers}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id])
    assert found.info.run_id == ids["mlflow_run_id"] and found.info.run_name == "tiny"
    assert found.info.status == "FINISHED"
    assert found.data.params["stages.pretrain.params.steps"] == "600"
    # Every step of both training stages, logged live by rank 0, equal to the stage's own history.
    for stage in ("pretrain", "finetune"):
        assert mlflow_steps(trackers, found.info.run_id, f"{stage}/loss") == losses(run / "stages" / stage)
    assert found.data.metrics["finetune.digits.top1"] == json.loads((run / "metrics.json").read_text())[
        "finetune.digits.top1"]
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"report.md", "report.html"}

    # W&B (offline): the same run id in every process that wrote to it, the same curves.
    folders = sorted((trackers / "wandb/wandb").glob(f"offline-run-*-{ids['wandb_run_id']}"))
    assert len(folders) == 4  # the driver (params), pretrain's and finetune's rank 0, the report
    rows = [row for folder in folders for row in wandb_items(wandb_records(folder), "history")]
    for stage in ("pretrain", "finetune"):
        assert [(r[f"{stage}/step"], r[f"{stage}/loss"]) for r in rows if f"{stage}/step" in r] == \
            losses(run / "stages" / stage)


def test_sigkill_during_finetune_then_resume_matches_the_clean_run(clean_run, trackers, tmp_path):
    clean, _, _ = clean_run
    run = tmp_path / "killed"
    shutil.copytree(clean, run)  # ingest and pretrain are done; the transfer stages are not
    (run / "tracking.json").unlink()  # a tracker run of its own
    for stage in ("finetune", "fewshot", "report"):
        shutil.rmtree(run / "stages" / stage)
    for name in ("report.md", "report.html", "metrics.json"):
        (run / name).unlink()

    first_checkpoint = run / "stages/finetune/checkpoints/step-00000050/COMPLETE.json"
    proc = start_cli("resume", str(run), "--no-dashboard", log=tmp_path / "killed.log", env=tracked_env(trackers))
    try:
        wait_for(first_checkpoint.exists, timeout=900, interval=0.2, what="finetune's first checkpoint")
    finally:
        _kill_group(proc)
    assert not (run / "stages/finetune/manifest.json").exists(), "finetune finished before the kill"

    # Execution params changed on resume (a loader process per worker, a new retry budget and log
    # cadence) are not a config change: finetune continues from its checkpoint, with the same samples.
    resumed = run_cli("resume", str(run), "--no-dashboard", "finetune.loader_workers=1", "finetune.max_failures=3",
                      "finetune.log_every=10", timeout=1800, env=tracked_env(trackers))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from checkpoint step 50" in resumed.stderr  # finetune continued, it did not restart
    assert not (run / "stages/finetune.previous").exists()
    # The resumed stage appended to the killed attempt's tracker run: every step, with the clean
    # run's values (steps redone after the checkpoint appear twice, equal).
    run_id = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    assert run_id != json.loads((clean / "tracking.json").read_text())["mlflow_run_id"]
    assert sorted(set(mlflow_steps(trackers, run_id, "finetune/loss"))) == losses(clean / "stages/finetune")
    events = read_events_file(run / "events.jsonl")
    last = events[max(i for i, e in enumerate(events) if e["event"] == "run_started"):]
    skipped = {e["stage"] for e in last if e["event"] == "stage_skipped"}
    finished = {e["stage"] for e in last if e["event"] == "stage_finished"}
    assert {"ingest", "pretrain"} <= skipped and {"finetune", "report"} <= finished
    assert skipped | finished == {"ingest", "pretrain", "finetune", "fewshot", "report"}
    # fewshot does not depend on finetune: it may have finished before the kill, but never runs twice.
    ours = events[next(i for i, e in enumerate(events) if e["event"] == "run_started" and "killed" in e["uri"]):]
    assert sum(e["event"] == "stage_finished" and e["stage"] == "fewshot" for e in ours) == 1

    def results(metrics_file: Path) -> dict:  # without the timings (goodput, wall time): those may differ
        metrics = json.loads(metrics_file.read_text())
        return {k: v for k, v in metrics.items() if not k.endswith((".goodput", ".wall_s"))}

    assert results(run / "metrics.json") == results(clean / "metrics.json")
    a = load_file(str(clean / "stages/finetune/model.safetensors"))
    b = load_file(str(run / "stages/finetune/model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a), "the resumed fine-tune differs from the clean one"
