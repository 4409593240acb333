"""The quiet console: what is kept off it (lines as Ray 2.60 and DeepSpeed 0.19.8 print them), what
still shows, and that everything reaches the run's log file."""

from __future__ import annotations

import io
import logging

import pytest

from cluster.console import ConsoleCapture, silenced_reason
from pipeline.storage import open_storage

HIDDEN = [
    "[2026-12-02 10:13:26,042 E 32553 32582] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: 'f319c3e7d7627ce82f732d7801000000' has constructor arguments in the object store and max_restarts > 0. If "
    "the arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.",
    "[2026-12-02 10:15:39,599] [WARNING] [engine.py:2304:_do_optimizer_sanity_check] **** You are using ZeRO with an "
    "untested optimizer, proceed with caution *****",
    "Requesting resources: {'CPU': 1.0} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1.0}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=192.0.2.2, pid=32702) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=2]",
]
SHOWN = [
    "pretrain step 50/600 loss 1.9488 lr 1.00e-03 348.8 img/s, ETA 1m43s",
    "[2026-12-02 10:13:26,042 E 32553 32582] core_worker.cc:2465: Actor with class name: 'Other' and ID: 'ab' has "
    "constructor arguments in the object store and max_restarts > 0.",
    "Worker group failed: a worker died (exit code -9); restarting from the latest checkpoint",
    "Traceback (most recent call last):",
    "[2026-12-02 10:15:39,599] [WARNING] [engine.py:2304:other_check] **** something else *****",
]


@pytest.mark.parametrize("line", HIDDEN)
def test_known_harmless_third_party_lines_are_kept_off_the_console(line):
    assert silenced_reason(line)


@pytest.mark.parametrize("line", SHOWN)
def test_everything_else_still_shows(line):
    assert silenced_reason(line) is None


@pytest.fixture
def console(monkeypatch):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    import ray  # noqa: F401 - as on the driver: Ray's logger has its own console handler

    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    monkeypatch.setattr(logging.getLogger("ray"), "handlers", [handler])
    return stream


@pytest.mark.parametrize("verbose", [False, True])
def test_worker_lines_and_driver_records_reach_the_log_file_whether_shown_or_not(tmp_path, console, verbose):
    printed: list[str] = []
    capture = ConsoleCapture(open_storage(str(tmp_path / "run")), verbose=verbose)
    with capture:
        capture._wrapped = ("ray_print_logs", lambda data: printed.extend(data["lines"]))  # Ray's printer
        capture._forward({"pid": 7, "actor_name": "TrainController", "is_err": True, "lines": HIDDEN[:1] + SHOWN[:1]})
        logging.getLogger("ray.auth").warning("Token authentication is enabled for this Ray cluster. Set "
                                              "RAY_AUTH_MODE=disabled to opt out. For more information, see ...")
        logging.getLogger("vitpipe.x").warning("a warning of ours")
    assert printed == (HIDDEN[:1] + SHOWN[:1] if verbose else SHOWN[:1])
    assert ("Token authentication" in console.getvalue()) is verbose and "a warning of ours" in console.getvalue()
    written = capture.path.read_text()
    assert capture.path.parent == tmp_path / "run" / "logs"
    for text in ("PreemptionWatcher", SHOWN[0], "Token authentication", "a warning of ours", "(TrainController pid=7)"):
        assert text in written
    logging.getLogger("ray.auth").warning("Token authentication is enabled for this Ray cluster. Set "
                                          "RAY_AUTH_MODE=disabled to opt out. After the block.")
    assert "After the block" in console.getvalue()  # the console filter left with the block
