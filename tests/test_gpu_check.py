"""The GPU check (``bench/gpu_check.sh`` and ``bench/gpu_check.py``) on the CPU.

The torchrun path runs for real on two gloo ranks, without Ray, with a tiny model: ZeRO-1 and
ZeRO-3, the loss rule, the crash-and-resume round trip (exact on the CPU) and the result JSON.
The shell script's argument handling, its refusal without CUDA and its wheel installation are
checked with a tiny wheel made here. The pure pieces (loss rule, resume comparison, MFU peak,
synthetic shards) are checked directly.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from stages.data.tarshards import iter_tar_samples
from stages.train.hardware import ACCELERATORS
from stages.train.metrics import StepRecord

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
from synthetic_shards import ShardSpec, ensure_shards, render_sample  # noqa: E402

SCRIPT = REPO / "bench" / "gpu_check.sh"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# --- the torchrun path: two gloo ranks, no Ray ---------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_check(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "bench/gpu_check.py", "--device", "cpu", "--out", str(out)])
    doc = json.loads((out / "gpu_check_train.json").read_text()) if (out / "gpu_check_train.json").exists() else {}
    assert proc.returncode == 0, doc.get("reason") or proc.stderr[-3000:]
    return proc, doc


def test_two_gloo_ranks_train_resume_and_report_both_zero_stages(two_rank_check):
    proc, doc = two_rank_check
    assert (doc["complete"], doc["passed"], doc["reason"]) == (True, True, None)
    assert (doc["device"], doc["world_size"], doc["shards"]["count"]) == ("cpu", 2, 16)
    assert doc["shards"]["plain_webdataset_reads"] in (True, None)  # None: webdataset not installed
    assert [s["zero_stage"] for s in doc["stages"]] == [1, 3]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines == doc["stages"]  # one JSON line per ZeRO stage on stdout
    for stage in doc["stages"]:
        assert (stage["passed"], stage["failures"]) == (True, [])
        assert (stage["global_batch"], stage["micro_batch"], stage["accumulation"]) == (16, 8, 1)
        assert stage["loss"]["passed"] and stage["loss"]["window_steps"] == 2
        resume = stage["resume"]
        # 12 steps, checkpoints at 4, 8, 12: the step-12 one is deleted, so steps 9-12 run again ...
        assert (resume["resumed_from"], resume["resumed_steps"]) == (8, 4)
        assert resume["steps_continuous"] and resume["history_restored"] and resume["ledgers_identical"]
        assert resume["handoff_written"]
        # ... and on the CPU they repeat the first run's losses exactly.
        assert (resume["first_step_rel_diff"], resume["max_abs_diff"]) == (0.0, 0.0)
        # Windows end at steps 2, 4, ..., 12; the first (warm-up) is left out of the medians.
        throughput = stage["throughput"]
        assert (throughput["windows"], throughput["warmup_excluded"]) == (5, True)
        assert throughput["images_per_s"] > 0 and 0 <= throughput["data_wait_fraction"] <= 1
        assert throughput["mfu"] is None and throughput["max_memory_gb"] is None  # CPU: no peak, no GPU memory
        assert not (Path(doc["shards"]["root"]).parent / f"zero{stage['zero_stage']}" / "checkpoints").exists()
    # Both ZeRO stages compute the same training (same seed, fp32): same losses.
    assert doc["stages"][0]["loss"] == doc["stages"][1]["loss"]


def test_a_failed_check_exits_non_zero_with_one_line(tmp_path):
    # One process without torchrun (a one-rank world), ZeRO-1 only, an impossible loss bar.
    proc = run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(tmp_path),
                "--zero-stages", "1", "--steps", "8", "--loss-ratio", "0.01"])
    assert proc.returncode == 1
    doc = json.loads((tmp_path / "gpu_check_train.json").read_text())
    assert (doc["complete"], doc["passed"], doc["world_size"]) == (True, False, 1)
    assert doc["reason"].startswith("ZeRO-1: the loss did not fall enough: ")
    assert doc["stages"][0]["resume"]["passed"]  # only the loss rule failed
    assert f"FAILED: {doc['reason']}" in proc.stderr.splitlines()[-1]


# --- pure pieces ---------------------------------------------------------------------------------------


def records(losses: list[float], timed: dict[int, float] | None = None) -> list[StepRecord]:
    timed = timed or {}
    return [StepRecord(step=i + 1, loss=loss, lr=1e-3, grad_norm=1.0, epoch=0, images_per_s=timed.get(i + 1))
            for i, loss in enumerate(losses)]


def test_the_loss_rule_compares_the_first_and_last_tenth():
    falling = [2.0] * 10 + [1.5] * 80 + [0.9] * 10
    assert gpu_check.loss_check(falling, 0.5) == {"first_mean": 2.0, "last_mean": 0.9, "window_steps": 10,
                                                  "ratio": 0.45, "max_ratio": 0.5, "passed": True}
    assert not gpu_check.loss_check([2.0] * 10 + [1.5] * 80 + [1.1] * 10, 0.5)["passed"]
    assert gpu_check.loss_check([2.0, 1.0, 0.5], 0.5)["window_steps"] == 1  # at least one step each


def test_the_resume_comparison_catches_what_a_broken_resume_does():
    first = records([2.0, 1.5, 1.2, 1.0, 0.9, 0.8], {2: 100.0, 4: 110.0, 6: 120.0})
    good = gpu_check.resume_check(first, list(first), 4, 0.0, 0.0)
    assert good["passed"] and (good["resumed_steps"], good["max_abs_diff"]) == (2, 0.0)
    # A run that started afresh: same steps and losses, other timings.
    afresh = [r if r.images_per_s is None else StepRecord(**{**r.to_json(), "images_per_s": 99.0}) for r in first]
    assert gpu_check.resume_check(first, afresh, 4, 0.0, 0.0)["failures"] == [
        "the history up to step 4 was not restored from the checkpoint (did the run start afresh?)"]
    # Steps 5-6 logged twice (a resume that replayed them on top of the history).
    replayed = first + first[4:]
    assert gpu_check.resume_check(first, replayed, 4, 0.0, 0.0)["failures"][0] == \
        "the resumed history numbers steps 1-6, 5-6, expected 1-6"
    # Losses off by 1% at the first resumed step: fine with a 2% tolerance, not with 0.5%.
    off = first[:4] + [StepRecord(**{**r.to_json(), "loss": r.loss * 1.01}) for r in first[4:]]
    assert gpu_check.resume_check(first, off, 4, 0.02, 0.02)["passed"]
    assert not gpu_check.resume_check(first, off, 4, 0.005, 0.02)["passed"]


def test_throughput_medians_leave_out_the_first_window():
    history = records([1.0] * 6, {2: 10.0, 4: 100.0, 6: 200.0})
    summary = gpu_check.throughput_summary(history)
    assert (summary["images_per_s"], summary["windows"], summary["warmup_excluded"]) == (150.0, 2, True)


def test_mfu_peak_by_card_name():
    assert gpu_check.card_peak_flops("NVIDIA H200") == ACCELERATORS["h200"].peak_flops
    assert gpu_check.card_peak_flops("NVIDIA H100 80GB HBM3") == ACCELERATORS["h100"].peak_flops
    assert gpu_check.card_peak_flops("NVIDIA A100-SXM4-80GB") == ACCELERATORS["a100"].peak_flops
    assert gpu_check.card_peak_flops("NVIDIA L40S") is None
    assert gpu_check.card_peak_flops("NVIDIA L40S", 362.0) == 362e12


def test_the_ray_config_is_a_valid_run_config(tmp_path):
    from pipeline.config import load_config

    args = gpu_check.parse_args(["--device", "cuda", "--work", str(tmp_path)])
    shards = ensure_shards(tmp_path / "shards", ShardSpec(images=8, classes=2, image_size=16, shard_samples=4))
    config = gpu_check.ray_config(args, shards, 8, "NVIDIA H200", tmp_path / "run")
    path = tmp_path / "ray.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    loaded = load_config(str(path))
    pretrain = loaded.stages["pretrain"].params
    assert (pretrain["workers"], pretrain["use_gpu"], pretrain["gpu"], pretrain["global_batch"]) == (8, True, "h200", 1024)
    assert loaded.stages["ingest"].params["validation"] == "none"


def test_synthetic_shards_are_cached_deterministic_and_plain_webdataset(tmp_path):
    spec = ShardSpec(images=10, classes=3, image_size=24, shard_samples=4)
    made = ensure_shards(tmp_path / "a" / "shards", spec, processes=2)
    assert ([s.samples for s in made.shards], made.cached) == ([4, 4, 2], False)
    assert ensure_shards(tmp_path / "a" / "shards", spec).cached
    again = ensure_shards(tmp_path / "b" / "shards", spec, processes=1)
    for a, b in zip(made.shards, again.shards):
        assert (tmp_path / "a" / a.path).read_bytes() == (tmp_path / "b" / b.path).read_bytes()
    with open(tmp_path / "a" / made.shards[0].path, "rb") as f:
        samples = list(iter_tar_samples(f))
    assert [(k, sorted(files), files["cls"]) for k, files in samples] == [
        ("s00000000", ["cls", "jpg"], b"0"), ("s00000001", ["cls", "jpg"], b"1"),
        ("s00000002", ["cls", "jpg"], b"2"), ("s00000003", ["cls", "jpg"], b"0")]
    assert samples[0][1]["jpg"] == render_sample(0, spec)[0]
    webdataset = pytest.importorskip("webdataset")
    read = list(webdataset.WebDataset(str(tmp_path / "a" / made.shards[0].path), shardshuffle=False))
    assert [(s["__key__"], s["cls"]) for s in read] == [(k, files["cls"]) for k, files in samples]


def test_the_classes_are_told_apart_by_mean_colour_alone():
    # The learnability the loss rule relies on: even the nearest class centroid of an image's mean
    # colour (a linear function of the patch embeddings' input) names its class.
    from PIL import Image

    classes, draws = 10, 20
    spec = ShardSpec(images=classes * draws, classes=classes, image_size=32, shard_samples=classes * draws)
    means = torch.tensor([Image.open(io.BytesIO(render_sample(k, spec)[0])).resize((1, 1)).getpixel((0, 0))
                          for k in range(classes * draws)], dtype=torch.float32).view(draws, classes, 3)
    centroids = means.mean(dim=0)  # (class, rgb)
    nearest = ((means[:, :, None, :] - centroids) ** 2).sum(-1).argmin(-1)  # (draw, class)
    assert (nearest == torch.arange(classes)).float().mean() >= 0.95


# --- the shell script --------------------------------------------------------------------------------------


def sh(*args: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return run(["bash", str(SCRIPT), "--python", sys.executable, *args], timeout=timeout)


def test_help_and_usage_errors():
    shown = sh("--help")
    assert shown.returncode == 0 and "--wheels DIR" in shown.stdout and "--quick" in shown.stdout
    for args, message in ((["--frobnicate"], "unknown option --frobnicate"), (["--wheels"], "--wheels needs a value"),
                          (["--steps", "0"], "--steps must be a positive integer"),
                          (["--wheels", "/nonexistent"], "--wheels /nonexistent is not a directory")):
        proc = sh(*args)
        assert (proc.returncode, proc.stderr) == (2, f"gpu_check: error: {message} (see --help)\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_stops_with_one_line(tmp_path):
    proc = sh("--out", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("gpu_check: error: torch.cuda.is_available() is False for ")
    assert "--device cpu" in proc.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(p["name"], p["status"]) for p in summary["phases"]] == [("environment", "failed")]


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel holding ``files`` (path -> source)."""
    dist_info = f"{name}-{version}.dist-info"
    contents = {**files, f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    contents[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in contents.items():
            z.writestr(path, text)
    return wheel


def test_wheels_install_what_is_missing_and_never_an_older_copy(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "gcprobe", "0.1", {"gcprobe/__init__.py": "VALUE = 42\n"})
    make_wheel(wheels, "PyYAML", "1.0", {"yaml/__init__.py": "raise ImportError('the old copy was used')\n"})
    proc = sh("--device", "cpu", "--env-only", "--wheels", str(wheels), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(p["name"], p["status"], p["reason"]) for p in summary["phases"]] == [
        ("environment", "ok", None), ("wheels", "ok", "installed 1 of 2 wheel(s)"), ("imports", "ok", None)]
    site = tmp_path / "out" / "gpu_check_work" / "site"
    assert (site / "gcprobe" / "__init__.py").is_file() and not (site / "yaml").exists()
    assert "PyYAML 6" in proc.stderr and "is installed (wheel 1.0)" in proc.stderr
    assert proc.stdout.startswith("gpu_check: PASSED in ")


def test_a_wheel_that_breaks_an_import_is_named(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # A project missing here whose wheel shadows tqdm with a module that cannot be imported.
    make_wheel(wheels, "gcshadow", "1.0", {"tqdm/__init__.py": "raise ImportError('broken on purpose')\n"})
    proc = sh("--device", "cpu", "--env-only", "--wheels", str(wheels), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(
        "gpu_check: error: cannot import tqdm (ImportError: broken on purpose; wheels: tqdm)")


def test_gpu_mfu_writes_the_result_file_the_check_reads(tmp_path):
    # bench/gpu_check.sh's mfu phases read this file; a run that exits 0 without it is a failure there.
    result = tmp_path / "sub" / "gpu_mfu_eager.json"
    proc = run([sys.executable, "bench/gpu_mfu.py", "--device", "cpu", "--no-timm", "--steps", "1", "--repeats", "1",
                "--warmup", "0", "--image-size", "32", "--json", str(result)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(result.read_text())
    assert doc["name"] == "gpu_mfu" and doc["baseline"] is None and doc["extra"]["compile"] is False
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == doc  # the same line as on stdout
