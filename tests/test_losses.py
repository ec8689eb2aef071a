"""kd_ray.losses against a hand computation in float64 numpy (explicit exp/log/sum, no F.kl_div)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_ray.losses import distill_loss, hinton_kd_per_sample

# Small fixed logits: 4 samples, 5 classes, with a large spread in one row to exercise stability.
STUDENT = np.array(
    [
        [1.0, 2.0, 0.5, -1.0, 0.0],
        [0.3, -0.2, 2.5, 1.0, -3.0],
        [-1.0, -1.0, -1.0, -1.0, -1.0],
        [12.0, -7.0, 3.0, 0.0, 5.5],
    ]
)
TEACHER = np.array(
    [
        [0.5, 3.0, 0.0, -2.0, 1.0],
        [2.0, 0.0, 1.0, 1.0, -1.0],
        [4.0, -2.0, 0.0, 1.0, 0.5],
        [10.0, -5.0, 6.0, 1.0, 2.0],
    ]
)
LABELS = np.array([1, 2, 0, 0])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def hand_kl(s: np.ndarray, t: np.ndarray, temperature: float) -> np.ndarray:
    """KL(softmax(t/T) || softmax(s/T)) per sample, without the T^2 factor."""
    p_t = softmax(t / temperature)
    return (p_t * (log_softmax(t / temperature) - log_softmax(s / temperature))).sum(axis=-1)


def hand_ce(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -log_softmax(s)[np.arange(len(y)), y]


def tensors(dtype=torch.float32):
    return (
        torch.tensor(STUDENT, dtype=dtype),
        torch.tensor(TEACHER, dtype=dtype),
        torch.tensor(LABELS, dtype=torch.int64),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 0.5])
def test_hinton_kd_per_sample_matches_hand_computation(temperature):
    s, t, _ = tensors()
    got = hinton_kd_per_sample(s, t, temperature)
    expected = hand_kl(STUDENT, TEACHER, temperature) * temperature**2
    assert got.shape == (4,)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()


def test_kd_is_zero_when_student_equals_teacher():
    _, t, _ = tensors()
    np.testing.assert_allclose(hinton_kd_per_sample(t, t, 4.0).numpy(), 0.0, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_t_squared_scaling(temperature):
    s, t, _ = tensors()
    kd = hinton_kd_per_sample(s, t, temperature).numpy()
    plain_kl = hand_kl(STUDENT, TEACHER, temperature)
    np.testing.assert_allclose(kd, temperature**2 * plain_kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_kd_gradient_wrt_student_logits(temperature):
    """d(T^2 KL)/ds = T (softmax(s/T) - softmax(t/T)) per sample: the T^2 factor cancels the
    1/T^2 of the tempered softmax's gradient down to a factor T, so soft-target gradients do not
    vanish as T grows."""
    s, t, _ = tensors()
    s.requires_grad_(True)
    hinton_kd_per_sample(s, t, temperature).sum().backward()
    expected = temperature * (softmax(STUDENT / temperature) - softmax(TEACHER / temperature))
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-4, atol=1e-6)
    # Each row's gradient sums to zero (a softmax difference).
    np.testing.assert_allclose(s.grad.sum(dim=-1).numpy(), 0.0, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_mix(alpha):
    s, t, y = tensors()
    temperature = 3.0
    terms = distill_loss(s, t, y, temperature=temperature, alpha=alpha, denominator=1.0)
    kd = hand_kl(STUDENT, TEACHER, temperature) * temperature**2
    ce = hand_ce(STUDENT, LABELS)
    expected = (alpha * kd + (1 - alpha) * ce).sum()
    assert terms.loss.dtype == torch.float32
    assert terms.loss.item() == pytest.approx(expected, rel=1e-5)
    assert terms.kd_sum.item() == pytest.approx(kd.sum(), rel=1e-5)
    assert terms.ce_sum.item() == pytest.approx(ce.sum(), rel=1e-5)
    assert terms.correct.item() == int((STUDENT.argmax(-1) == LABELS).sum())


def test_alpha_endpoints_are_pure_terms():
    s, t, y = tensors()
    ce_only = distill_loss(s, t, y, temperature=4.0, alpha=0.0, denominator=1.0)
    kd_only = distill_loss(s, t, y, temperature=4.0, alpha=1.0, denominator=1.0)
    assert ce_only.loss.item() == pytest.approx(hand_ce(STUDENT, LABELS).sum(), rel=1e-5)
    assert kd_only.loss.item() == pytest.approx((hand_kl(STUDENT, TEACHER, 4.0) * 16).sum(), rel=1e-5)
    mixed = distill_loss(s, t, y, temperature=4.0, alpha=0.3, denominator=1.0)
    assert mixed.loss.item() == pytest.approx(0.3 * kd_only.loss.item() + 0.7 * ce_only.loss.item(), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
def test_no_teacher_is_cross_entropy_only(alpha):
    s, _, y = tensors()
    terms = distill_loss(s, None, y, temperature=4.0, alpha=alpha, denominator=1.0)
    assert terms.loss.item() == pytest.approx(hand_ce(STUDENT, LABELS).sum(), rel=1e-5)
    assert terms.kd_sum.item() == 0.0
    assert terms.ce_sum.item() == pytest.approx(terms.loss.item(), rel=1e-6)


@pytest.mark.parametrize("denominator", [1.0, 4.0, 7.0, 32.0])
def test_denominator_divides_the_sum(denominator):
    s, t, y = tensors()
    base = distill_loss(s, t, y, temperature=2.0, alpha=0.6, denominator=1.0).loss.item()
    got = distill_loss(s, t, y, temperature=2.0, alpha=0.6, denominator=denominator)
    assert got.loss.item() == pytest.approx(base / denominator, rel=1e-6)
    # The logged sums are not divided.
    assert got.kd_sum.item() == pytest.approx(distill_loss(s, t, y, temperature=2.0, alpha=0.6, denominator=1.0).kd_sum.item())


def test_logged_sums_are_detached():
    s, t, y = tensors()
    s.requires_grad_(True)
    terms = distill_loss(s, t, y, temperature=2.0, alpha=0.5, denominator=4.0)
    assert terms.loss.requires_grad
    assert not terms.kd_sum.requires_grad and not terms.ce_sum.requires_grad and not terms.correct.requires_grad


def test_split_batch_sums_to_whole_batch():
    """Summed loss / denominator: two halves with the whole batch's denominator add up exactly."""
    s, t, y = tensors()
    whole = distill_loss(s, t, y, temperature=4.0, alpha=0.7, denominator=4.0).loss
    halves = sum(distill_loss(s[i : i + 2], t[i : i + 2], y[i : i + 2], temperature=4.0, alpha=0.7, denominator=4.0).loss for i in (0, 2))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)


def test_fp32_under_bf16_autocast():
    s32, t32, y = tensors()
    s16, t16 = s32.to(torch.bfloat16), t32.to(torch.bfloat16)
    s16.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = distill_loss(s16, t16, y, temperature=4.0, alpha=0.7, denominator=4.0)
    assert terms.loss.dtype == torch.float32
    assert terms.kd_sum.dtype == torch.float32 and terms.ce_sum.dtype == torch.float32
    reference = distill_loss(s16.detach().float(), t16.float(), y, temperature=4.0, alpha=0.7, denominator=4.0)
    assert terms.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6, abs=1e-7)
    terms.loss.backward()
    assert s16.grad is not None and s16.grad.dtype == torch.bfloat16


def test_fp32_loss_from_an_autocast_forward():
    """The usual path: a bf16 autocast forward produces bf16 logits; the loss is still fp32."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5)
    x = torch.randn(4, 8)
    _, t, y = tensors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        terms = distill_loss(logits, t, y, temperature=2.0, alpha=0.5, denominator=4.0)
    assert terms.loss.dtype == torch.float32
    reference = distill_loss(logits.detach().float(), t, y, temperature=2.0, alpha=0.5, denominator=4.0)
    assert terms.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)
    terms.loss.backward()
    assert layer.weight.grad.dtype == torch.float32


def test_fp16_teacher_logits():
    s, t, y = tensors()
    t16 = t.to(torch.float16)
    terms = distill_loss(s, t16, y, temperature=4.0, alpha=0.9, denominator=4.0)
    assert terms.loss.dtype == torch.float32
    expected_kd = hand_kl(STUDENT, t16.float().numpy().astype(np.float64), 4.0) * 16
    expected = (0.9 * expected_kd + 0.1 * hand_ce(STUDENT, LABELS)).sum() / 4.0
    assert terms.loss.item() == pytest.approx(expected, rel=1e-5)


def _autograd_buckets(z, idx, targets, temperature):
    """The student's buckets written as plain autograd ops: what the fused function must equal."""
    s = z / temperature
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    rest = torch.logsumexp(s.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([s.gather(-1, idx), rest], dim=-1) - lse, lse, s.gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_fused_student_buckets_and_their_gradient_equal_autograds(temperature):
    from kd_ray.losses import _StudentBuckets

    g = torch.Generator().manual_seed(0)
    n, v, k = 7, 40, 5
    z = (3 * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_(True)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0] = idx[0, 2]  # a target inside the top k, and others outside it
    ups = [torch.randn(n, k + 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64),
           torch.randn(n, generator=g, dtype=torch.float64)]
    got = _StudentBuckets.apply(z, idx, targets, temperature)
    grad = torch.autograd.grad(got, z, ups)[0]
    want = _autograd_buckets(z, idx, targets, temperature)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad, torch.autograd.grad(want, z, ups)[0])  # float64, any upstream gradient


def test_the_fused_student_buckets_with_an_empty_tail_have_finite_gradients():
    from kd_ray.losses import _StudentBuckets

    z = torch.randn(3, 6, requires_grad=True)
    idx = torch.stack([torch.randperm(6) for _ in range(3)])  # k = V: nothing is left for the tail
    log_q, lse, s_y = _StudentBuckets.apply(z, idx, torch.zeros(3, dtype=torch.long), 1.0)
    (log_q[:, :-1].sum() + log_q[:, -1].clamp_min(-50).sum() + lse.sum() + s_y.sum()).backward()
    assert torch.isfinite(z.grad).all()
