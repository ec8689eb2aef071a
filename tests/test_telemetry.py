"""The run telemetry's arithmetic and verdicts (pure: no Ray)."""

import pytest

from kd_ray.telemetry import pool_window, run_telemetry, verdict


def test_pool_window_counts_only_actors_that_worked():
    before = {"a": (100, 1.0), "b": (50, 0.5)}
    now = {"a": (300, 2.0), "b": (50, 0.5), "c": (100, 1.0)}  # b idle, c new
    w = pool_window(before, now, seconds=2.0)
    assert w["actors"] == 2
    assert w["rows_per_second"] == pytest.approx(150.0)  # (200 + 100) / 2
    assert w["busy_fraction"] == pytest.approx(0.5)  # (1 + 1) / (2 s x 2 actors)


def test_pool_window_of_nothing():
    assert pool_window({}, {}, 1.0) == {"actors": 0, "rows_per_second": 0.0, "busy_fraction": 0.0}
    assert pool_window({"a": (1, 1.0)}, {"a": (2, 1.5)}, 0.0)["rows_per_second"] == 0.0


@pytest.mark.parametrize("wait, busy, expected", [
    (0.02, 0.99, "student"),          # never waits: the student is the limit, however busy the pool
    (0.40, 0.95, "teacher pool"),     # waits, and the teacher is saturated
    (0.40, 0.30, "input pipeline"),   # waits, but the teacher idles
    (0.40, None, "input pipeline"),   # no teacher (cached or supervised)
])
def test_verdict(wait, busy, expected):
    name, advice = verdict(wait, busy)
    assert name == expected and advice
    assert ("teacher.placement: colocated" in advice) == (busy is not None and expected != "student")


@pytest.mark.parametrize("share, expected", [(0.7, "colocated teacher"), (0.2, "student")])
def test_verdict_of_a_colocated_teacher_suggests_the_pool_when_it_takes_most_of_the_step(share, expected):
    name, advice = verdict(0.02, None, share)
    assert name == expected and ("teacher.placement: pool" in advice) == (expected == "colocated teacher")


def test_run_telemetry_of_a_colocated_teacher():
    events = [{**event(10.0, 0.1, 10), "teacher_seconds": 6.0}, {**event(10.0, 0.1, 10), "teacher_seconds": 7.0}]
    out = run_telemetry(events)
    assert out["colocated_teacher_fraction"] == pytest.approx(13.0 / 19.8, abs=1e-4)
    assert out["bottleneck"] == "colocated teacher" and "70%" not in out["advice"] and "66%" in out["advice"]


def event(seconds, wait, steps, pool=None):
    e = {"window_seconds": seconds, "data_wait_seconds": wait, "window_steps": steps}
    if pool:
        e["teacher_pool"] = pool
    return e


def test_run_telemetry_weights_windows_by_time():
    events = [event(10.0, 5.0, 10, {"actors": 1, "rows_per_second": 100.0, "busy_fraction": 1.0}),
              event(30.0, 3.0, 54, {"actors": 2, "rows_per_second": 300.0, "busy_fraction": 0.5})]
    t = run_telemetry(events)
    assert t["student_step_seconds"] == pytest.approx((40 - 8) / 64)
    assert t["data_wait_fraction"] == pytest.approx(0.2)
    pool = t["teacher_pool"]
    assert pool["actors_max"] == 2 and pool["actors_mean"] == pytest.approx((10 + 60) / 40)
    assert pool["rows_per_second"] == pytest.approx((1000 + 9000) / 40)
    assert pool["busy_fraction"] == pytest.approx((10 + 30) / 70, abs=1e-4)  # busy / actor-seconds (rounded)
    assert t["bottleneck"] == "input pipeline"  # waited 20%, teacher busy 57%


def test_run_telemetry_without_teacher_or_windows():
    t = run_telemetry([event(10.0, 0.1, 5), event(10.0, 0.1, 5)])
    assert "teacher_pool" not in t and t["bottleneck"] == "student"
    assert run_telemetry([])["student_step_seconds"] is None


def test_start_up_windows_count_apart():
    events = [{**event(20.0, 15.0, 10), "startup": True}, event(10.0, 0.2, 10), event(10.0, 0.2, 10)]
    t = run_telemetry(events)
    assert t["data_wait_fraction"] == pytest.approx(0.02) and t["startup_wait_seconds"] == 15.0
    assert t["bottleneck"] == "student"
    assert run_telemetry(events[:1])["data_wait_fraction"] == pytest.approx(0.75)  # nothing else to go on


def test_pool_figures_come_from_the_windows_it_worked_in():
    idle = {"actors": 0, "rows_per_second": 0.0, "busy_fraction": 0.0}
    events = [{**event(10.0, 8.0, 10, {"actors": 2, "rows_per_second": 500.0, "busy_fraction": 0.9}), "startup": True},
              event(10.0, 0.1, 10, idle), event(10.0, 0.1, 10, idle)]
    t = run_telemetry(events)
    assert t["teacher_pool"] == {"actors_max": 2, "actors_mean": 2.0, "rows_per_second": 500.0, "busy_fraction": 0.9}
    assert t["bottleneck"] == "student"  # it streamed everything out early; the student never waited after


def test_poll_every_keeps_ten_steps_and_polls_fast_steps_about_once_a_second():
    from kd_ray.telemetry import poll_every

    assert poll_every(20.0, 100) == 10  # 0.2 s steps: every 10, as always
    assert poll_every(2.0, 200) == 100  # 10 ms steps: every 100, a second
    assert poll_every(0.2, 200) == 1000  # 1 ms steps
    assert poll_every(0.0, 0) == poll_every(5.0, 0) == 10  # no window yet
