"""Batch arithmetic, the LR schedule, the eval split, the local CPU budget and the data transforms."""

from __future__ import annotations

import numpy as np
import pytest

from kd_ray import batch_plan
from kd_ray.batch_plan import BatchPlan, accumulation_steps, plan, total_steps
from kd_ray.core.columns import ID, X, Y
from kd_ray.core.errors import UserError
from kd_ray.data.ids import is_eval
from kd_ray.data.transforms import augment, preprocess
from kd_ray.train.optim import lr_factor

# ---------------------------------------------------------------------------------------------
# accumulation_steps


@pytest.mark.parametrize(
    "global_batch, micro, world, expected",
    [(64, 32, 2, 1), (64, 8, 2, 4), (32, 8, 1, 4), (32, 32, 1, 1), (96, 16, 3, 2), (1, 1, 1, 1), (256, 8, 4, 8)],
)
def test_accumulation_steps(global_batch, micro, world, expected):
    acc = accumulation_steps(global_batch, micro, world)
    assert acc == expected
    assert micro * acc * world == global_batch


@pytest.mark.parametrize(
    "global_batch, micro, world, options",
    [
        (65, 32, 2, "use 64 or 128,"),
        (96, 32, 2, "use 64 or 128,"),
        (30, 8, 2, "use 16 or 32,"),
        (10, 16, 1, "use 16,"),  # no "0 or 16": a zero batch is never suggested
        (48, 16, 4, "use 64,"),
    ],
)
def test_accumulation_steps_refuses_uneven_split(global_batch, micro, world, options):
    with pytest.raises(UserError) as info:
        accumulation_steps(global_batch, micro, world)
    e = info.value
    assert e.field == "train.global_batch_size"
    assert options in e.message
    assert f"{micro} x {world} = {micro * world}" in e.message
    assert "\n" not in str(e)
    # Every suggested value is a valid global batch for the same micro batch and world size.
    suggested = [int(v) for v in e.message.split("use ", 1)[1].split(",")[0].split(" or ")]
    for v in suggested:
        assert v > 0 and v % (micro * world) == 0
        accumulation_steps(v, micro, world)


# ---------------------------------------------------------------------------------------------
# steps and epochs


@pytest.mark.parametrize(
    "epochs, max_steps, expected",
    [
        (2, None, 44),  # 2 x 1437 rows // 64: a global batch may span two passes
        (1, None, 22),
        (3, None, 67),  # 4311 // 64: the remainders of the passes add up to one more step
        (None, 10, 10),
        (2, 100, 44),  # both: whichever comes first
        (5, 30, 30),
        (None, 1000, 1000),  # max_steps alone may exceed one epoch
    ],
)
def test_total_steps(epochs, max_steps, expected):
    assert total_steps(1437, 64, epochs, max_steps) == expected


def test_total_steps_refuses_batch_larger_than_data():
    with pytest.raises(UserError) as info:
        total_steps(50, 64, 1, None)
    assert info.value.field == "train.global_batch_size"
    assert "50" in info.value.message and "64" in info.value.message


def test_plan_and_loss_denominator():
    p = plan(1000, 64, 8, 2, None, 20)
    assert p == BatchPlan(global_batch=64, micro_batch=8, world_size=2, accumulation=4, train_rows=1000, total_steps=20)
    # Samples per worker per optimizer step: each worker's share of the global batch.
    assert p.loss_denominator == 8 * 4 == p.global_batch // p.world_size
    assert p.passes == 2  # 20 x 64 = 1280 samples: the second pass is partial
    assert p.epochs_done(15) == 0 and p.epochs_done(16) == 1  # 1024 samples complete the first pass


@pytest.mark.parametrize(
    "rows, global_batch, micro, world, epochs, max_steps",
    [(1000, 64, 8, 2, 3, None), (1437, 64, 32, 2, 5, None), (1437, 64, 16, 1, 5, 50), (100, 32, 4, 4, None, 7), (640, 64, 64, 1, 1, 10)],
)
def test_plan_invariants(rows, global_batch, micro, world, epochs, max_steps):
    p = plan(rows, global_batch, micro, world, epochs, max_steps)
    assert p.micro_batch * p.accumulation * p.world_size == p.global_batch
    assert p.loss_denominator * p.world_size == p.global_batch
    assert p.total_steps == total_steps(rows, global_batch, epochs, max_steps)
    # the stream holds enough passes for every step, and not one pass more
    assert (p.passes - 1) * rows < p.total_steps * global_batch <= p.passes * rows
    if epochs and not max_steps:
        assert p.passes == epochs
        # only the run's last partial global batch is left out: fewer samples than one batch
        assert 0 <= epochs * rows - p.total_steps * global_batch < global_batch


def test_plan_refuses_uneven_split():
    with pytest.raises(UserError) as info:
        batch_plan.plan(1000, 60, 8, 2, 1, None)
    assert info.value.field == "train.global_batch_size"


# ---------------------------------------------------------------------------------------------
# LR schedule


def test_lr_warmup_is_linear():
    factors = [lr_factor(s, 10, 100, 0.0) for s in range(10)]
    np.testing.assert_allclose(factors, [(s + 1) / 10 for s in range(10)])
    np.testing.assert_allclose(np.diff(factors), 0.1)
    assert lr_factor(10, 10, 100, 0.0) == pytest.approx(1.0)


def test_lr_no_warmup_starts_at_one():
    assert lr_factor(0, 0, 100, 0.1) == pytest.approx(1.0)


@pytest.mark.parametrize("warmup, total, min_ratio", [(10, 100, 0.0), (0, 50, 0.1), (5, 6, 0.25), (20, 1000, 0.05)])
def test_lr_cosine_reaches_min_ratio_and_is_monotone(warmup, total, min_ratio):
    after = [lr_factor(s, warmup, total, min_ratio) for s in range(warmup, total + 1)]
    assert after[0] == pytest.approx(1.0)
    assert after[-1] == pytest.approx(min_ratio)
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert all(min_ratio - 1e-12 <= f <= 1.0 + 1e-12 for f in after)
    # Past the end (e.g. a resumed run with more steps) it stays at the floor.
    assert lr_factor(total + 5, warmup, total, min_ratio) == pytest.approx(min_ratio)
    # Halfway through the cosine: the midpoint between 1 and min_ratio.
    if (total - warmup) % 2 == 0:
        mid = warmup + (total - warmup) // 2
        assert lr_factor(mid, warmup, total, min_ratio) == pytest.approx((1 + min_ratio) / 2)


# ---------------------------------------------------------------------------------------------
# Eval split


def test_is_eval_deterministic_and_fraction():
    ids = np.arange(100_000, dtype=np.int64)
    a = is_eval(ids, 0.2, seed=0)
    b = is_eval(ids.copy(), 0.2, seed=0)
    assert a.dtype == bool and a.shape == ids.shape
    np.testing.assert_array_equal(a, b)
    assert abs(a.mean() - 0.2) < 0.01
    # Per-id: the same answer whatever batch an id arrives in.
    np.testing.assert_array_equal(is_eval(ids[5000:5100], 0.2, 0), a[5000:5100])
    np.testing.assert_array_equal(is_eval(ids[::-1], 0.2, 0), a[::-1])


def test_is_eval_differs_by_seed():
    ids = np.arange(100_000, dtype=np.int64)
    a, c = is_eval(ids, 0.2, 0), is_eval(ids, 0.2, 1)
    assert abs(c.mean() - 0.2) < 0.01
    assert not np.array_equal(a, c)
    # Independent splits overlap on about fraction^2 of the ids.
    assert abs((a & c).mean() - 0.04) < 0.01


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.5, 0.9])
def test_is_eval_fractions_and_nesting(fraction):
    ids = np.arange(100_000, dtype=np.int64)
    m = is_eval(ids, fraction, 3)
    assert abs(m.mean() - fraction) < 0.01
    # A larger fraction keeps every id of a smaller one (same hash, higher threshold).
    assert not (m & ~is_eval(ids, min(fraction + 0.1, 0.99), 3)).any()


def test_is_eval_accepts_hash_ids():
    """Parquet row hashes are arbitrary int64 values, negative ones included."""
    ids = np.array([-(2**63), -1, 0, 1, 2**63 - 1, 123456789012345], dtype=np.int64)
    m = is_eval(ids, 0.5, 7)
    assert m.shape == ids.shape
    np.testing.assert_array_equal(m, is_eval(ids, 0.5, 7))


# ---------------------------------------------------------------------------------------------
# Local CPU budget (no Ray is started: only the pure function is imported)


@pytest.mark.parametrize(
    "physical, train_cpus, teacher_cpus",
    [(2, 2, 1), (2, 1, 0), (1, 1, 1), (16, 2, 1), (4, 4, 4), (2, 2.5, 0.5), (64, 8, 16)],
)
def test_local_cpu_budget(physical, train_cpus, teacher_cpus):
    from kd_ray.cluster import local_cpu_budget

    budget = local_cpu_budget(physical, train_cpus, teacher_cpus)
    assert isinstance(budget, int)
    assert budget >= physical
    # Workers and teacher actors hold their CPUs for the whole run; Ray Data still needs some.
    assert budget > train_cpus + teacher_cpus
    assert budget - (train_cpus + teacher_cpus) >= 1


def test_local_cpu_budget_on_a_two_core_box():
    from kd_ray.cluster import local_cpu_budget

    # The quickstart: 2 workers x 1 CPU and one teacher actor on a 2-core machine.
    assert local_cpu_budget(2, 2, 1) >= 2 + 1 + 1


# ---------------------------------------------------------------------------------------------
# Transforms


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def _batch(x: np.ndarray) -> dict:
    n = len(x)
    return {ID: _readonly(np.arange(n, dtype=np.int64)), X: _readonly(x), Y: _readonly(np.arange(n, dtype=np.int64) % 10)}


def test_preprocess_does_not_modify_read_only_input():
    x = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32) * 16
    batch = _batch(x.copy())
    before = batch[X].copy()
    out = preprocess(batch, scale=0.0625, mean=0.5, std=0.25)
    np.testing.assert_array_equal(batch[X], before)
    assert not batch[X].flags.writeable
    assert out[X] is not batch[X]
    assert out[X].dtype == np.float32 and out[X].shape == x.shape
    np.testing.assert_allclose(out[X], (x * 0.0625 - 0.5) / 0.25, rtol=1e-6)
    assert out[ID] is batch[ID] and out[Y] is batch[Y]


def test_preprocess_integer_input():
    x = np.arange(2 * 64, dtype=np.uint8).reshape(2, 1, 8, 8)
    out = preprocess(_batch(x), scale=1 / 255, mean=0.0, std=1.0)
    assert out[X].dtype == np.float32
    np.testing.assert_allclose(out[X], x.astype(np.float32) / 255, rtol=1e-6)


def test_preprocess_per_channel_mean_std():
    rng = np.random.default_rng(1)
    x = rng.random((5, 3, 4, 4)).astype(np.float32)
    mean, std = [0.1, 0.2, 0.3], [1.0, 2.0, 4.0]
    out = preprocess(_batch(x), scale=2.0, mean=mean, std=std)[X]
    assert out.shape == x.shape and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[:, c], (x[:, c] * 2.0 - mean[c]) / std[c], rtol=1e-5, atol=1e-6)


def test_preprocess_per_feature_on_flat_samples():
    x = np.random.default_rng(2).random((4, 3)).astype(np.float32)
    out = preprocess(_batch(x), scale=1.0, mean=[1.0, 2.0, 3.0], std=[1.0, 1.0, 2.0])[X]
    np.testing.assert_allclose(out, (x - np.array([1.0, 2.0, 3.0])) / np.array([1.0, 1.0, 2.0]), rtol=1e-6)


@pytest.mark.parametrize(
    "noise_std, shift, hflip",
    [(0.1, 0, False), (0.0, 2, False), (0.0, 0, True), (0.2, 1, True), (0.0, 0, False)],
)
def test_augment_does_not_modify_read_only_input_and_keeps_shapes(noise_std, shift, hflip):
    x = np.random.default_rng(3).random((8, 1, 8, 8)).astype(np.float32)
    batch = _batch(x.copy())
    before = batch[X].copy()
    out = augment(batch, noise_std=noise_std, shift=shift, hflip=hflip, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(batch[X], before)
    assert not batch[X].flags.writeable
    assert out[X].shape == x.shape and out[X].dtype == np.float32
    assert out[X] is not batch[X]
    assert out[ID] is batch[ID] and out[Y] is batch[Y]
    if not (noise_std or shift or hflip):
        np.testing.assert_array_equal(out[X], x)


def test_augment_hflip_flips_or_keeps_each_sample():
    x = np.random.default_rng(4).random((32, 2, 5, 6)).astype(np.float32)
    out = augment(_batch(x), noise_std=0.0, shift=0, hflip=True, rng=np.random.default_rng(1))[X]
    same = [np.array_equal(out[i], x[i]) for i in range(len(x))]
    flipped = [np.array_equal(out[i], x[i][..., ::-1]) for i in range(len(x))]
    assert all(s or f for s, f in zip(same, flipped))
    assert any(same) and any(flipped)


def test_augment_shift_moves_pixels_with_zero_padding():
    x = np.random.default_rng(5).random((16, 1, 8, 8)).astype(np.float32) + 1.0  # no zeros in the input
    out = augment(_batch(x), noise_std=0.0, shift=2, hflip=False, rng=np.random.default_rng(2))[X]
    for i in range(len(x)):
        nonzero = out[i][out[i] != 0]
        assert np.isin(nonzero, x[i]).all()  # every surviving pixel comes from the same sample
        assert (out[i] != 0).sum() >= 6 * 6  # at most 2 rows and 2 columns shifted out


def test_augment_needs_image_shaped_samples_for_shift():
    with pytest.raises(ValueError, match="data.shape"):
        augment(_batch(np.zeros((2, 64), np.float32)), noise_std=0.0, shift=1, hflip=False)


def test_augment_noise_is_fresh_per_call():
    x = np.zeros((4, 1, 8, 8), np.float32)
    a = augment(_batch(x), noise_std=0.1, shift=0, hflip=False)[X]
    b = augment(_batch(x), noise_std=0.1, shift=0, hflip=False)[X]
    assert not np.array_equal(a, b)
    assert 0.05 < a.std() < 0.2


# ---------------------------------------------------------------------------------------------
# blocks of the Ray Data stream: whole micro-batches, dealt round-robin


@pytest.mark.parametrize(
    "global_batch, micro, low, high",
    [(100, 100, 1, 1), (64, 8, 1, 1), (96, 4, 1, 4), (64, 8, 2, 2), (48, 4, 1, 3), (32, 16, 1, 2), (3072, 16, 2, 4)],
)
def test_blocks_keep_every_step_on_its_global_batch(global_batch, micro, low, high):
    """Whatever the world size, the split's round-robin deal of blocks of k micro-batches gives
    optimizer step s exactly positions [s x G, (s + 1) x G), from any step-aligned start."""
    k = batch_plan.micro_batches_per_block(global_batch, micro, low, high)
    assert 1 <= k and k * micro <= max(batch_plan.BLOCK_ROWS, micro)
    for world in range(low, high + 1):
        acc = global_batch // (micro * world)
        start = 3 * global_batch
        steps = 4
        per_rank = steps * acc
        got = {r: batch_plan.block_positions(start, r, world, micro, k, 0, per_rank) for r in range(world)}
        # what the split deals: block b (k x micro rows from start) to rank b % world
        rows = np.arange(start, start + steps * global_batch)
        blocks = [rows[i:i + k * micro] for i in range(0, len(rows), k * micro)]
        for r in range(world):
            dealt = np.concatenate(blocks[r::world])[:per_rank * micro]
            np.testing.assert_array_equal(got[r], dealt)
        for s in range(steps):
            step_rows = np.concatenate([got[r][s * acc * micro:(s + 1) * acc * micro] for r in range(world)])
            np.testing.assert_array_equal(np.sort(step_rows), start + np.arange(s * global_batch, (s + 1) * global_batch))
        # a later block's positions, asked for on their own, are the same
        np.testing.assert_array_equal(batch_plan.block_positions(start, 0, world, micro, k, 1, 2), got[0][micro:3 * micro])


def test_one_worker_takes_large_blocks_and_elastic_groups_smaller_ones():
    assert batch_plan.micro_batches_per_block(100, 100, 1, 1) == 10  # 1,000 rows: any k with one worker
    assert batch_plan.micro_batches_per_block(64, 8, 2, 2) == 4  # accumulation 4
    assert batch_plan.micro_batches_per_block(48, 4, 1, 3) == 2  # accumulation 12, 6, 4: k divides all
    assert batch_plan.micro_batches_per_block(32, 16, 1, 2) == 1  # accumulation 1 at 2 workers


def test_order_check_counts_rows_out_of_place():
    import torch

    from kd_ray.train.batches import OrderCheck

    k, m, world = 2, 4, 2
    check = OrderCheck(8, 1, world, m, k, torch.device("cpu"))
    first = torch.from_numpy(batch_plan.block_positions(8, 1, world, m, k, 0, k))
    assert check.see(first) == k
    check.verify()
    wrong = torch.from_numpy(batch_plan.block_positions(8, 0, world, m, k, 2, k))  # rank 0's next block
    check.see(wrong)
    with pytest.raises(RuntimeError, match="out of the planned order"):
        check.verify()
    short = OrderCheck(0, 0, 1, m, 1, torch.device("cpu"))
    short.see(torch.arange(m + 1))  # part of a micro-batch more: the stream is broken
    with pytest.raises(RuntimeError):
        short.verify()


@pytest.mark.parametrize("sizes", [[1024, 1024, 1024], [100, 300, 7, 93, 1, 99, 400], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 3], [250]])
@pytest.mark.parametrize("cat", ["numpy", "torch"])
def test_whole_micro_batches_keep_every_row_in_order(sizes, cat):
    import torch

    from kd_ray.core.columns import POS
    from kd_ray.data.local import whole_micro_batches

    m, rows = 50, sum(sizes)
    x = np.random.default_rng(3).random((rows, 4), dtype=np.float32)
    cuts = np.cumsum([0, *sizes])
    blocks = [{POS: np.arange(a, b), X: x[a:b]} for a, b in zip(cuts[:-1], cuts[1:])]
    join = np.concatenate
    if cat == "torch":
        blocks = [{k: torch.from_numpy(v) for k, v in b.items()} for b in blocks]
        join = torch.cat
    out = list(whole_micro_batches(iter(blocks), m, join))
    assert all(len(b[POS]) % m == 0 and len(b[POS]) for b in out[:-1]) and len(out[-1][POS])
    assert len(out[-1][POS]) % m == rows % m  # a part of a micro-batch at the stream's end comes out last, alone
    np.testing.assert_array_equal(np.concatenate([np.asarray(b[POS]) for b in out]), np.arange(rows))
    np.testing.assert_array_equal(np.concatenate([np.asarray(b[X]) for b in out]), x)
    # At most one micro-batch per block is a copy: the rest are views of the blocks as they came
    copies = sum(1 for b in out if not any(np.shares_memory(np.asarray(b[X]), np.asarray(s[X])) for s in blocks))
    assert copies <= len(sizes)


@pytest.mark.parametrize("rows,world,batch", [(1797, 1, 512), (1797, 2, 512), (1797, 3, 100), (10, 4, 1), (5, 4, 2), (3, 4, 8),
                                              (1024, 2, 512), (1025, 2, 512), (7, 7, 1)])
def test_eval_batches_count_every_row_once_in_as_many_batches_on_every_rank(rows, world, batch):
    from kd_ray.data.local import eval_batch_bounds

    ranks = [eval_batch_bounds(rows, r, world, batch) for r in range(world)]
    counts = {len(b) for b in ranks}
    assert len(counts) == 1  # the same number of batches on every rank: their forwards may be collectives
    if rows < world:  # fewer rows than ranks: no rank evaluates (as Ray Data's equal split)
        assert counts == {0}
        return
    sizes = np.concatenate([np.diff(b) for b in ranks])
    assert sizes.min() >= 1 and sizes.max() <= batch + 1  # never empty; at most one row over the batch size
    assert all(b[0] == rows * r // world and b[-1] == rows * (r + 1) // world for r, b in enumerate(ranks))  # contiguous shares
    covered = np.concatenate([np.arange(b[0], b[-1]) for b in ranks])
    np.testing.assert_array_equal(covered, np.arange(rows))  # every row once
    if world == 1:
        assert sizes.max() <= batch


def test_sized_batches_cut_blocks_of_any_size_in_order():
    from kd_ray.core.columns import POS
    from kd_ray.data.local import sized_batches

    x = np.arange(100, dtype=np.float32)
    cuts = [0, 3, 40, 41, 77, 100]
    blocks = [{POS: np.arange(a, b), X: x[a:b]} for a, b in zip(cuts[:-1], cuts[1:])]
    out = list(sized_batches(iter(blocks), [10, 30, 1, 50]))
    assert [len(b[POS]) for b in out] == [10, 30, 1, 50]
    np.testing.assert_array_equal(np.concatenate([b[X] for b in out]), x[:91])  # rows past the sizes are not read into one
    assert [len(b[POS]) for b in sized_batches(iter(blocks), [60, 60])] == [60]  # a size the blocks cannot fill: the end
