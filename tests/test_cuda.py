"""kd_ray's CUDA paths, on a real GPU: skipped where there is none (CI has none).

- The student step under bf16 autocast tracks fp32; fp16 with GradScaler trains, and skips the
  update (and halves the scale) when a gradient overflows.
- torch.compile of the student trains like eager; the optimizer is fused AdamW, and its update
  is the foreach one's.
- A conv student is built channels_last and computes what a contiguous one does.
- The LM step (chunked per-token loss, top-k teacher) at bf16 tracks fp32, and the teacher's
  signal at bf16 ranks the same tokens as at fp32.
- FSDP2 with the bf16 mixed-precision policy on one NCCL rank gives DDP-free training's gradients.
- A colocated teacher's forward queued on its own stream, overlapping the student's step, sends
  what it sends when run in turn (kd_ray.train.colocated), and the student trains the same.
- End to end (slow): `kd-ray run` with the teacher pool and the student on one GPU (0.5 each),
  bf16, compile, pinned batches from Ray Data, checkpoints, evaluation.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from kd_ray.core.columns import (
    DOCS,
    TAIL_LSE,
    TARGETS,
    TEACHER,
    TOKEN_POS,
    TOKENS,
    TOPK_INDICES,
    TOPK_VALUES,
    X,
    Y,
)
from kd_ray.losses import topk_compress
from kd_ray.models import convnet, mlp
from kd_ray.models.precision import grad_scaler
from kd_ray.tasks.classify import micro_step
from kd_ray.train.optim import make_optimizer, make_scheduler
from kd_ray.train.step import optimizer_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPT = {"name": "adamw", "lr": 0.01, "weight_decay": 0.0, "betas": (0.9, 0.999), "momentum": 0.9}
SCHEDULE = {"warmup_steps": 0, "min_lr_ratio": 0.0}
CUDA = torch.device("cuda")


def _batches(n=6, size=64, features=64, device=CUDA, image=None):
    g = torch.Generator().manual_seed(0)
    shape = image or (features,)
    out = []
    for _ in range(n):
        out.append({X: torch.randn(size, *shape, generator=g).to(device), TEACHER: (torch.randn(size, 10, generator=g) * 3).to(device),
                    Y: torch.randint(0, 10, (size,), generator=g).to(device)})
    return out


def _train(model, precision, data, device=CUDA):
    optimizer = make_optimizer(model.parameters(), OPT, device)
    scheduler = make_scheduler(optimizer, SCHEDULE, total_steps=len(data))
    scaler = grad_scaler(precision, device)
    losses = []
    for batch in data:
        terms = micro_step(model, batch, temperature=4.0, alpha=0.7, denominator=len(batch[Y]), precision=precision,
                           device=device, scaler=scaler)
        assert terms.loss.dtype == torch.float32  # the loss is fp32 whatever the forward ran in
        optimizer_step(model, optimizer, scheduler, scaler, grad_clip=1.0)
        losses.append(terms.loss.detach())
    return torch.stack(losses).cpu(), optimizer, scaler


def test_bf16_step_tracks_fp32_and_runs_its_matmuls_in_bf16():
    torch.manual_seed(0)
    fp32 = mlp(hidden=256, depth=2).to(CUDA)
    bf16 = copy.deepcopy(fp32)
    seen = []
    next(m for m in bf16.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    data = _batches()
    ref, _, _ = _train(fp32, "fp32", data)
    low, _, scaler = _train(bf16, "bf16", data)
    assert scaler is None and seen[0] == torch.bfloat16
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05)


def test_fp16_with_grad_scaler_trains_and_skips_an_overflowing_step():
    torch.manual_seed(0)
    model = mlp(hidden=256, depth=2).to(CUDA)
    data = _batches(n=8)
    losses, optimizer, scaler = _train(model, "fp16", data[:1] * 8)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert torch.isfinite(losses).all() and losses[-1] < losses[0] * 0.8
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    bad = {**data[0], X: data[0][X].clone()}
    bad[X][0, 0] = 1e30  # overflows fp16 in the forward: the gradients are inf/nan
    scheduler = make_scheduler(optimizer, SCHEDULE, total_steps=10)
    micro_step(model, bad, temperature=4.0, alpha=0.7, denominator=64, precision="fp16", device=CUDA, scaler=scaler)
    optimizer_step(model, optimizer, scheduler, scaler, grad_clip=1.0)
    assert scaler.get_scale() == scale / 2  # backed off
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)  # the update was skipped


def test_compiled_student_trains_like_eager_on_cuda():
    torch.manual_seed(0)
    eager = mlp(hidden=256, depth=2).to(CUDA)
    base = copy.deepcopy(eager)
    data = _batches()
    ref, _, _ = _train(eager, "bf16", data)
    got, _, _ = _train(torch.compile(base), "bf16", data)
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02)


def test_the_optimizer_is_fused_adamw_and_matches_foreach():
    torch.manual_seed(0)
    a = mlp(hidden=128, depth=1).to(CUDA)
    b = copy.deepcopy(a)
    fused = make_optimizer(a.parameters(), OPT, CUDA)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(b.parameters(), lr=OPT["lr"], weight_decay=0.0, foreach=True)
    for batch in _batches(n=3):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(batch[X]), batch[Y]).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_conv_student_is_built_channels_last_and_computes_the_same():
    from kd_ray.spec import parse
    from kd_ray.tasks.classify import Classify

    spec = parse({"run": {"name": "t"}, "data": {"source": "builtin:digits", "shape": [1, 8, 8]},
                  "student": {"model": "convnet", "kwargs": {"in_channels": 1, "num_classes": 10, "width": 16, "blocks": 2}},
                  "train": {"max_steps": 1, "global_batch_size": 8, "micro_batch_size": 8, "use_gpu": True}})
    student = Classify(spec).build_student(CUDA)
    # A conv with one input channel is both layouts at once: look at one with several.
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    plain = convnet(in_channels=1, num_classes=10, width=16, blocks=2).to(CUDA)
    plain.load_state_dict(student.state_dict())
    x = torch.randn(32, 1, 8, 8, device=CUDA)
    student.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), plain(x), rtol=1e-3, atol=1e-3)
    losses, _, _ = _train(student, "bf16", _batches(image=(1, 8, 8)))
    assert torch.isfinite(losses).all()


# ---------------------------------------------------------------------------------------------- LM

VOCAB, SEQ, ROWS = 1000, 128, 4
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _lm_spec(precision: str, strategy: str = "ddp"):
    from kd_ray.spec import parse

    return parse({"task": "causal_lm", "run": {"name": "t"}, "data": {"source": "x.jsonl", "tokenizer": "tok.json"},
                  "student": {"model": "llama"}, "distill": {"temperature": 1.0, "alpha": 0.8, "top_k": 16, "chunk_tokens": 256},
                  "train": {"max_steps": 1, "global_batch_size": ROWS, "micro_batch_size": ROWS, "precision": precision,
                            "strategy": strategy, "use_gpu": True}})


def _lm_batch(device=CUDA) -> dict:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -7:] = -100
    top = topk_compress(3 * torch.randn(ROWS, SEQ, VOCAB, generator=g), 16, temperatures=1.0, dtype=torch.float16)
    batch = {TOKENS: tokens, TOKEN_POS: torch.arange(SEQ).expand(ROWS, SEQ), TARGETS: targets, DOCS: torch.zeros(ROWS, SEQ, dtype=torch.long),
             TOPK_VALUES: top.values, TOPK_INDICES: top.indices.int(), TAIL_LSE: top.tail_lse}
    return {k: v.to(device) for k, v in batch.items()}


def _lm_student(device=CUDA):
    from kd_ray.models.lm import llama
    from kd_ray.tasks.causal_lm import StudentLM

    torch.manual_seed(0)
    return StudentLM(llama(vocab_size=VOCAB, **SMALL), VOCAB).to(device)


def _lm_steps(precision: str, steps: int = 4, device=CUDA):
    from kd_ray.tasks.causal_lm import CausalLM

    task, model, batch = CausalLM(_lm_spec(precision)), _lm_student(device), _lm_batch(device)
    seen = []
    model.lm.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    optimizer = make_optimizer(model.parameters(), OPT, device)
    scheduler = make_scheduler(optimizer, SCHEDULE, total_steps=steps)
    losses = []
    for _ in range(steps):
        terms = task.micro_step(model, batch, task.count(batch), device, grad_scaler(precision, device))
        optimizer_step(model, optimizer, scheduler, None, grad_clip=1.0)
        losses.append(terms.loss.detach())
    assert seen[0] == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]  # the decoder's matmuls
    return torch.stack(losses).cpu()


def test_lm_step_at_bf16_tracks_fp32():
    ref, low = _lm_steps("fp32"), _lm_steps("bf16")
    assert torch.isfinite(low).all() and low[-1] < low[0]
    torch.testing.assert_close(low, ref, rtol=0.03, atol=0.03)


def test_lm_teacher_signal_at_bf16_ranks_as_fp32():
    from kd_ray.tasks.causal_lm import CausalLM

    task = CausalLM(_lm_spec("bf16"))
    batch = {k: v.numpy() for k, v in _lm_batch(torch.device("cpu")).items()}  # numpy columns, as the pool gets them
    task.vocab = VOCAB  # no tokenizer here: the vocabulary it would give
    teacher = _lm_student().lm.eval()
    keep, low = task.teacher_signal(teacher, batch, CUDA, "bf16", (1.0,))
    _, ref = task.teacher_signal(teacher, batch, CUDA, "fp32", (1.0,))
    assert int(keep.sum()) == ROWS * (SEQ - 7) and low[TOPK_VALUES].dtype == torch.float16
    top1 = (low[TOPK_INDICES][:, 0] == ref[TOPK_INDICES][:, 0]).float().mean()
    assert top1 > 0.9  # bf16 logits may swap near-ties only
    torch.testing.assert_close(low[TOPK_VALUES][:, 0].float(), ref[TOPK_VALUES][:, 0].float(), rtol=0.05, atol=0.05)


def _fsdp_cases(rank: int):
    """On one NCCL rank: the bf16 LM step's loss and gradients under FSDP2's mixed-precision
    policy, with activation checkpointing per decoder block."""
    from kd_ray.models.weights import clean_key
    from kd_ray.tasks.causal_lm import CausalLM
    from kd_ray.train.parallel import wrap

    def run():
        torch.cuda.set_device(0)
        task, batch = CausalLM(_lm_spec("bf16", "fsdp")), _lm_batch()
        student = _lm_student()
        model = wrap(student, "fsdp", "bf16", CUDA, task.fsdp_units(student), checkpointing=True)
        terms = task.micro_step(model, batch, task.count(batch), CUDA, None)
        grads = {clean_key(n): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().cpu()
                 for n, p in model.named_parameters()}
        return {"loss": terms.loss.detach().float().cpu(), "grads": grads}

    return [("fsdp", run)]


def test_fsdp2_bf16_policy_on_nccl_gives_the_autocast_gradients(tmp_path):
    from conftest import spawn_gloo

    from kd_ray.tasks.causal_lm import CausalLM

    got = spawn_gloo(_fsdp_cases, 1, str(tmp_path), timeout=120, backend="nccl")[0]["fsdp"]
    assert isinstance(got, dict), got  # else the rank's traceback
    task, batch, model = CausalLM(_lm_spec("bf16")), _lm_batch(), _lm_student()
    terms = task.micro_step(model, batch, task.count(batch), CUDA, None)
    torch.testing.assert_close(got["loss"], terms.loss.detach().float().cpu(), rtol=0.02, atol=0.02)
    assert set(got["grads"]) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        g, ref = got["grads"][name], p.grad.float().cpu()
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))


# ---------------------------------------------------------------------------------------------- colocated teacher


def test_colocated_teacher_on_a_side_stream_sends_what_it_sends_in_turn(teacher_weights):
    """Each micro-batch's teacher forward runs on the side stream while the student's step on the one
    before runs on the main stream; the student consumes the outputs and frees its own memory in
    between, so a missing wait or record_stream would show as different logits or weights."""
    from pathlib import Path

    from conftest import TEACHER_SPEC, digits_job

    from kd_ray.spec import parse
    from kd_ray.tasks.classify import Classify
    from kd_ray.train.colocated import ColocatedTeacher

    job = digits_job(Path("unused"), "side_stream")
    job["teacher"] = {**TEACHER_SPEC, "weights": teacher_weights, "placement": "colocated"}
    job["train"].update(use_gpu=True, num_workers=1)
    spec = parse(job)
    teacher = ColocatedTeacher(spec, Classify(spec), CUDA)
    g = torch.Generator().manual_seed(0)
    batches = [{X: torch.rand(256, 1, 8, 8, generator=g).to(CUDA), Y: torch.randint(0, 10, (256,), generator=g).to(CUDA)}
               for _ in range(8)]

    def train(signal):
        torch.manual_seed(0)
        student = mlp(in_features=64, num_classes=10, hidden=2048, depth=3).to(CUDA)
        optimizer = make_optimizer(student.parameters(), OPT, CUDA)
        logits = []
        for batch in signal:
            micro_step(student, {**batch, X: batch[X].flatten(1)}, temperature=2.0, alpha=0.5, denominator=256.0,
                       precision="fp32", device=CUDA, scaler=None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logits.append(batch[TEACHER].clone())
        return logits, {n: p.detach().clone() for n, p in student.named_parameters()}

    overlapped, weights = train(teacher.signal(iter(batches)))
    in_turn, reference = train(teacher(b) for b in batches)
    assert len(overlapped) == len(in_turn) == len(batches)
    for a, b in zip(overlapped, in_turn):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, w in weights.items():
        torch.testing.assert_close(w, reference[name], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_kd_run_on_one_gpu_bf16_compile_pinned(teacher_weights, tmp_path):
    from conftest import kd_job, run_cli, write_job

    job = kd_job(tmp_path, "cuda_kd", teacher_weights, num_workers=1, use_gpu=True, precision="bf16", compile="default",
                 resources_per_worker={"GPU": 0.5})
    job["teacher"].update({"precision": "bf16", "compile": True,
                           "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 64, "gpus_per_actor": 0.5}})
    job["checkpoint"] = {"every_steps": 10}
    proc = run_cli(["run", write_job(tmp_path / "cuda_kd.yaml", job)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "cuda_kd"
    summary = json.loads((run_dir / "summary.json").read_text())
    print(json.dumps(summary, indent=1)[:3000])
    assert summary["status"] == "finished" and summary["student"]["accuracy"] > 0.6, summary
    assert any(name.startswith("checkpoint") for name in os.listdir(run_dir))
