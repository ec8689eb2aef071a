"""kd_ray.core.errors.reason: the line a failed run ends with, from the exceptions Ray really raises
(built here from Ray's own exception classes, no cluster)."""

from __future__ import annotations

import traceback

from kd_ray.core.errors import reason


def _raised_in_a_ray_task(fn, *, udf: bool):
    """`fn`'s exception as a Ray task's error reaches the driver: wrapped by Ray Data's
    UserCodeException (when `udf`) and by RayTaskError, as a worker's `ray.get` raises it."""
    from ray.exceptions import RayTaskError, UserCodeException

    try:
        try:
            fn()
        except Exception as e:
            if not udf:
                raise
            raise UserCodeException("UDF failed to process a data block.") from e
    except Exception as e:
        return RayTaskError("MapBatches(read_chunks)", traceback.format_exc(), e).as_instanceof_cause()


def _stale_read():
    raise RuntimeError("data.source: 1 of 635 rows read (the first with id 7) differ from the inputs the cache at /c "
                       "was captured from")


def _bad_label():
    try:
        {}["label"]
    except KeyError as e:
        raise IndexError("index 7 is out of bounds for axis 1 with size 5") from e


def test_the_users_exception_not_rays_wrappers():
    assert reason(_raised_in_a_ray_task(_stale_read, udf=True)) == (
        "RuntimeError: data.source: 1 of 635 rows read (the first with id 7) differ from the inputs the cache at /c "
        "was captured from")
    # a user's own chain keeps its outermost exception: the one their code chose to raise
    assert reason(_raised_in_a_ray_task(_bad_label, udf=False)) == "IndexError: index 7 is out of bounds for axis 1 with size 5"
    assert reason(_raised_in_a_ray_task(_bad_label, udf=True)) == "IndexError: index 7 is out of bounds for axis 1 with size 5"


def test_the_lowest_failed_rank_of_a_worker_group():
    from ray.train import WorkerGroupError

    failures = {3: _raised_in_a_ray_task(_bad_label, udf=False), 1: _raised_in_a_ray_task(_stale_read, udf=True)}
    error = WorkerGroupError("Training failed due to worker errors:\n... (Output truncated) ...", failures)
    assert reason(error).startswith("RuntimeError: data.source: 1 of 635 rows read")
    # an exception raised by the train function itself is kept as raised, with no traceback text
    bare = WorkerGroupError("...", {0: IndexError("Target 7 is out of bounds."), 1: KeyError("label")})
    assert reason(bare) == "IndexError: Target 7 is out of bounds."
    assert reason(KeyError("label")) == "KeyError: 'label'"
    assert reason(ValueError("first\n  second")) == "ValueError: first second"


def test_only_wrappers_or_nothing():
    from ray.exceptions import UserCodeException

    assert reason(UserCodeException("UDF failed to process a data block.")) == \
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    assert reason(ValueError("")) == "ValueError"


def test_each_reason_once_per_attempt():
    from kd_ray.run.console import FailureLines

    lines = FailureLines()
    start, err = {"kind": "start"}, lambda rank, m: {"kind": "error", "rank": rank, "message": m}
    shown = [lines.show(e) for e in (start, err(0, "A"), err(1, "A"), err(1, "B"),  # one attempt, two ranks
                                     start, err(1, "A"), err(0, "A"),               # the next, after its start
                                     err(0, "A"), err(1, "A"))]                     # one that failed before its start
    assert shown == [True, True, False, True, True, True, False, True, False]
