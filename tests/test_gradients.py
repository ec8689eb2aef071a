"""Gradient invariance: one global batch gives the same gradient however it is split.

The train loop divides each micro-batch's summed loss by BatchPlan.loss_denominator (samples
per worker per optimizer step) and lets DDP / FSDP2 average over workers. Here the same global
batch of 32 is pushed through kd_ray.tasks.classify.micro_step in four set-ups, with real
torch.distributed (gloo, 2 spawned processes on 127.0.0.1) for the parallel ones, and every
gradient must match the single-process, single-micro-batch one. No Ray is started.
"""

from __future__ import annotations

import pytest
import torch
from conftest import spawn_gloo

from kd_ray.batch_plan import plan
from kd_ray.core.columns import TEACHER, X, Y
from kd_ray.models import mlp
from kd_ray.tasks.classify import micro_step
from kd_ray.train.parallel import grad_sync, unwrap, wrap

GLOBAL_BATCH = 32
FEATURES, CLASSES = 16, 5
TEMPERATURE, ALPHA = 4.0, 0.7
WORLD = 2
MODEL_KWARGS = dict(in_features=FEATURES, num_classes=CLASSES, hidden=12, depth=2)
SPAWN_TIMEOUT_S = 180  # a hang guard only; ~7 s on an idle 2-core box


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        X: torch.randn(GLOBAL_BATCH, FEATURES, generator=g),
        TEACHER: 3 * torch.randn(GLOBAL_BATCH, CLASSES, generator=g),
        Y: torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g),
    }


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process
    return mlp(**MODEL_KWARGS)


def accumulate(model, data, start: int, stop: int, micro: int, world: int) -> None:
    """The train loop's inner loop over one worker's share [start, stop) of the global batch."""
    p = plan(num_rows=GLOBAL_BATCH * 4, global_batch=GLOBAL_BATCH, micro_batch=micro, world_size=world, epochs=1, max_steps=None)
    assert p.accumulation * micro == stop - start
    for i in range(p.accumulation):
        lo = start + i * micro
        batch = {k: v[lo : lo + micro] for k, v in data.items()}
        with grad_sync(model, (i + 1) % p.accumulation == 0):  # as the Trainer runs a task's micro-step
            micro_step(model, batch, temperature=TEMPERATURE, alpha=ALPHA, denominator=p.loss_denominator,
                       precision="fp32", device=torch.device("cpu"), scaler=None)


def grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in unwrap(model).named_parameters():
        g = param.grad
        if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor (a collective: all ranks call it)
            g = g.full_tensor()
        out[name] = g.detach().clone()
    return out


def single_process(micro: int) -> dict[str, torch.Tensor]:
    model = make_model()
    accumulate(model, make_data(), 0, GLOBAL_BATCH, micro, world=1)
    return grads(model)


def _cases(rank: int):
    """This rank's half of the global batch, trained under DDP, then under FSDP2."""
    data = make_data()
    share = GLOBAL_BATCH // WORLD
    start, stop = rank * share, (rank + 1) * share

    def run(strategy: str):
        model = wrap(make_model(), strategy, "fp32", torch.device("cpu"))
        accumulate(model, data, start, stop, micro=8, world=WORLD)
        return grads(model)

    return [(strategy, lambda s=strategy: run(s)) for strategy in ("ddp", "fsdp")]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """(a) one process, one micro-batch of 32."""
    return single_process(micro=GLOBAL_BATCH)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    """(c) DDP and (d) FSDP2, in one pair of spawned processes (spawning costs seconds)."""
    return spawn_gloo(_cases, WORLD, str(tmp_path_factory.mktemp("grads")), SPAWN_TIMEOUT_S)


def assert_same_grads(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_reference_gradient_is_the_global_mean(reference):
    """(a) is the gradient of the mean per-sample loss over the global batch."""
    from kd_ray.losses import distill_loss

    model = make_model()
    data = make_data()
    logits = model(data[X])
    per_sample = [
        distill_loss(logits[i : i + 1], data[TEACHER][i : i + 1], data[Y][i : i + 1], temperature=TEMPERATURE, alpha=ALPHA, denominator=1.0).loss
        for i in range(GLOBAL_BATCH)
    ]
    torch.stack(per_sample).mean().backward()
    assert_same_grads(grads(model), reference)
    assert any(g.abs().sum() > 0 for g in reference.values())


@pytest.mark.parametrize("micro", [8, 4, 16])
def test_accumulation_matches_one_big_batch(reference, micro):
    """(b) one process, micro-batches accumulated (grad_sync is a no-op on a plain module)."""
    assert_same_grads(single_process(micro), reference)


def test_ddp_matches_one_big_batch(reference, two_process_results):
    """(c) two DDP processes, each half the batch as 2 micro-batches of 8; DDP averages."""
    for rank, res in enumerate(two_process_results):
        assert isinstance(res["ddp"], dict), f"rank {rank}:\n{res['ddp']}"
        assert_same_grads(res["ddp"], reference)


def test_fsdp2_matches_one_big_batch(reference, two_process_results):
    """(d) two FSDP2 processes, same split; full gradients gathered from the shards."""
    for rank, res in enumerate(two_process_results):
        # No skip: the pinned torch (.ci/constraints.txt) runs FSDP2's collectives on gloo, and a
        # build that cannot must fail here, not pass the parity check unseen.
        if isinstance(res["fsdp"], str):
            pytest.fail(f"rank {rank} FSDP2 failed (torch {torch.__version__}):\n{res['fsdp']}")
        assert_same_grads(res["fsdp"], reference)


def test_no_graph_breaks_in_forward_and_loss():
    """Nothing in the student's forward + distill_loss forces a host sync (.item()) or a graph break."""
    from kd_ray.losses import distill_loss

    model = mlp(in_features=8, num_classes=4, hidden=8, depth=1)
    x, t, y = torch.randn(4, 8), torch.randn(4, 4), torch.randint(0, 4, (4,))

    def step(x, t, y):
        return distill_loss(model(x), t, y, temperature=TEMPERATURE, alpha=ALPHA, denominator=4.0)

    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(step)(x, t, y)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
