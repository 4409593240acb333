"""Goodput accounting: the pure bucket arithmetic and the per-process clock (a fake clock: exact)."""

from __future__ import annotations

import pytest

from stages.train import goodput
from stages.train.goodput import BUCKETS, AttemptTiming, PhaseClock, account


def timing(attempt: int, started: float, recorded: float, final: bool = False, **buckets: float) -> AttemptTiming:
    return AttemptTiming(attempt=attempt, started=started, recorded=recorded, step=0, final=final,
                         buckets={name: buckets.get(name, 0.0) for name in BUCKETS[:-3]})


def test_one_attempt_fills_every_second_of_the_stage():
    attempt = timing(0, 103, 150, final=True, startup=2, data_wait=5, compute=37, checkpoint_save=3)
    g = account(100, 152, [timing(0, 103, 110, startup=2), attempt])  # only the newest snapshot counts
    assert g.buckets == {"startup": 5, "checkpoint_restore": 0, "data_wait": 5, "compute": 37,
                         "checkpoint_save": 3, "evaluation": 0, "lost_to_restarts": 0, "shutdown": 2, "other": 0}
    assert (g.wall_s, g.attempts) == (52, 1)
    assert g.fraction == pytest.approx(37 / 52)


def test_time_after_a_failed_attempts_last_snapshot_is_lost_to_the_restart():
    earlier_driver = timing(0, 50, 90, final=True, compute=40)  # an earlier run of the stage: not this one
    first = timing(1, 101, 120, startup=1, compute=15)  # its last snapshot: the step-4 checkpoint
    second = timing(2, 130, 170, final=True, startup=1, checkpoint_restore=2, compute=30)
    g = account(100, 172, [earlier_driver, first, second], first_attempt=1)
    assert g.attempts == 2
    assert g.buckets["lost_to_restarts"] == 10  # 120 -> 130: redone steps, detection, the new group
    assert g.buckets["startup"] == 1 + 1 + 1 and g.buckets["compute"] == 45 and g.buckets["shutdown"] == 2
    assert g.buckets["other"] == 72 - (3 + 2 + 45 + 10 + 2)


def test_a_group_that_ended_without_its_final_snapshot_lost_its_last_stretch():
    g = account(0, 60, [timing(0, 5, 40, compute=30)])
    assert g.buckets["lost_to_restarts"] == 20 and g.buckets["shutdown"] == 0


def test_clock_skew_never_makes_a_bucket_negative():
    g = account(100, 150, [timing(0, 99, 160, final=True, compute=70)])  # a node's clock ahead of the driver's
    assert min(g.buckets.values()) >= 0 and g.buckets["other"] == 0


def test_the_loop_charges_compute_net_of_data_waits_and_checkpoint_saves(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(goodput.time, "perf_counter", lambda: now[0])
    clock = PhaseClock(started_at=0.0)
    mark = now[0]
    now[0] += 4
    mark = clock.charge("startup", mark)
    now[0] += 1
    clock.charge("checkpoint_restore", mark)
    clock.start_loop()
    now[0] += 10  # ten seconds of steps, three of which the loader kept the host waiting
    clock.add("data_wait", 3)
    with clock.phase("checkpoint_save"):
        now[0] += 2
    clock.settle_loop()
    now[0] += 5
    clock.settle_loop()
    assert clock.buckets == {"startup": 4, "checkpoint_restore": 1, "data_wait": 3, "compute": 7 + 5,
                             "checkpoint_save": 2, "evaluation": 0}
