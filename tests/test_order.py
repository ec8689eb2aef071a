"""The run's sample order (kd_ray.data.order): pure functions, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from kd_ray.data import order


def layout(sizes, random_access, window=1, chunk_rows=7, drop_every=0):
    """Units of the given sizes; `drop_every`: every k-th row belongs to the other split."""
    units = tuple(np.array([r for r in range(n) if not (drop_every and r % drop_every == 0)], dtype=np.int64) for n in sizes)
    return order.Layout(units, random_access=random_access, chunk_rows=chunk_rows, window=window)


def epoch_rows(lay, seed, epoch, shuffle):
    chunks, starts = order.epoch_chunks(lay, seed, epoch, shuffle)
    assert len(chunks) == lay.chunks_per_epoch(shuffle)
    assert starts[-1] == lay.rows and (np.diff(starts) == [len(c[0]) for c in chunks]).all()
    units = np.concatenate([c[0] for c in chunks])
    rows = np.concatenate([c[1] for c in chunks])
    return list(zip(units.tolist(), rows.tolist()))


CASES = [
    (dict(sizes=[10, 10, 5], random_access=True), "global"),
    (dict(sizes=[10, 10, 5], random_access=True), "local"),
    (dict(sizes=[10, 10, 5], random_access=True), "none"),
    (dict(sizes=[9, 4, 12, 7, 3], random_access=False, window=2, drop_every=3), "global"),
    (dict(sizes=[9, 4, 12, 7, 3], random_access=False, window=2, drop_every=3), "local"),
    (dict(sizes=[9, 4, 12, 7, 3], random_access=False, window=1), "none"),
]


@pytest.mark.parametrize("kwargs,shuffle", CASES)
def test_every_epoch_visits_every_row_once(kwargs, shuffle):
    lay = layout(**kwargs)
    everything = sorted((u, r) for u, rows in enumerate(lay.units) for r in rows.tolist())
    for epoch in range(4):
        seen = epoch_rows(lay, 3, epoch, shuffle)
        assert sorted(seen) == everything  # once each, nothing else


@pytest.mark.parametrize("kwargs,shuffle", CASES)
def test_order_is_a_function_of_seed_and_epoch(kwargs, shuffle):
    lay, again = layout(**kwargs), layout(**kwargs)  # a rebuilt layout (another process) agrees
    assert epoch_rows(lay, 3, 1, shuffle) == epoch_rows(again, 3, 1, shuffle)
    if shuffle == "none":
        assert epoch_rows(lay, 3, 0, shuffle) == epoch_rows(lay, 4, 1, shuffle)
    else:
        assert epoch_rows(lay, 3, 0, shuffle) != epoch_rows(lay, 3, 1, shuffle)
        assert epoch_rows(lay, 3, 0, shuffle) != epoch_rows(lay, 4, 0, shuffle)


def test_global_row_groups_keep_each_window_together():
    """Without random access a global shuffle permutes row groups and mixes rows only within a
    window, so each chunk reads `window` row groups, not all of them."""
    lay = layout([5] * 8, random_access=False, window=2)
    chunks, _ = order.epoch_chunks(lay, 0, 0, "global")
    assert [len(set(c[0].tolist())) for c in chunks] == [2, 2, 2, 2]
    assert sorted(u for c in chunks for u in set(c[0].tolist())) == list(range(8))


def test_positions_number_the_stream_across_epochs():
    lay = layout([10, 10, 5], random_access=True)
    n, per_epoch = lay.rows, lay.chunks_per_epoch("global")
    positions = np.concatenate([order.positions_of_chunk(lay, 0, "global", i)[1] for i in range(3 * per_epoch)])
    np.testing.assert_array_equal(positions, np.arange(3 * n))
    assert order.stream_chunks(lay, "global", 2 * n) == 2 * per_epoch
    assert order.stream_chunks(lay, "global", 2 * n + 1) == 3 * per_epoch
    _, _, epoch = order.positions_of_chunk(lay, 0, "global", per_epoch)
    assert epoch == 1


def test_split_units():
    ids = [np.array([4, 5, 6]), np.array([7, 8])]
    assert [u.tolist() for u in order.split_units(ids, lambda i: i % 2 == 0)] == [[0, 2], [1]]


def test_prefetched_keeps_order_raises_where_the_error_was_and_stops_when_closed():
    import threading
    import time

    from kd_ray.data.local import prefetched

    def within(seconds, fn):
        """fn() in a thread: a lost item or error would block the consumer forever, not fail."""
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
        t.start()
        t.join(seconds)
        assert not t.is_alive(), "the consumer is blocked"
        return out["value"]

    assert within(10, lambda: list(prefetched(iter(range(50)), 3))) == list(range(50))
    assert list(prefetched(iter(range(5)), 0)) == list(range(5))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad chunk")

    def consume_failing():
        got = []
        try:
            for item in prefetched(failing(), 2):
                got.append(item)
        except ValueError as e:
            return got, str(e)
        return got, None

    assert within(10, consume_failing) == ([1, 2], "bad chunk")

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetched(endless(), 2)
    assert next(it) == 0
    it.close()  # as the loop does after its last step
    deadline = time.monotonic() + 10
    while any(t.name == "kd_ray-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "kd_ray-prefetch" for t in threading.enumerate())
    assert len(produced) <= 5  # at most the queue's depth ahead, then nothing


def test_one_value_hashes_as_the_array_hash():
    """seeds draws one value at a time (every optimizer step) with mix64_one: the same numbers
    as mix64, so no seed, order or view changed when it stopped building arrays."""
    from kd_ray.core.hashing import mix64, mix64_one

    rng = np.random.default_rng(3)
    values = np.concatenate([rng.integers(-2**63, 2**63 - 1, 200, dtype=np.int64), [0, -1, 2**63 - 1, -2**63]])
    for seed in (0, 1, 17, 2**40 + 3, -5, 2**64 - 1):
        assert [mix64_one(int(v), seed) for v in values] == mix64(values, seed).tolist()
