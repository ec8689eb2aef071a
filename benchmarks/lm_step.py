#!/usr/bin/env python
"""The language-model training step, side by side: kd_ray's distillation step against a plain
PyTorch cross-entropy step on the same student and tokens, at each precision.

    python benchmarks/lm_step.py                              # CPU: the LM quickstart's student, 2 rows x 256
    python benchmarks/lm_step.py --preset gpu --json lm.json  # CUDA: SmolLM2-135M's shape, 8 rows x 1,024

Rows (each timed in this process, CUDA-synchronised, after warm-up steps):
  plain CE     the student's full logits for every token, torch's cross-entropy, backward, clip,
               AdamW step (fused on CUDA): the speed limit of training this student at all
  kd_ray KD    kd_ray's step: CausalLM.micro_step (the chunked per-token loss over the teacher's
               top-k + tail, recomputed in backward) + optimizer_step, with the teacher's columns
               already in the batch, as the pool or the cache delivers them
for each of --precisions, and with --compile also the compiled student (mode default).
Reported: tokens/s (median of --windows windows of --window-steps steps), the ratio kd_ray / plain
at each precision and each row against its fp32, and on CUDA the peak memory allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

PRESETS = {
    # The LM quickstart's student (jobs/lm_quickstart.yaml) at its micro-batch.
    "cpu": dict(device="cpu", rows=2, seq=256, vocab=49_152, k=64, precisions="fp32,bf16",
                model=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024),
                warmup=2, window_steps=3, windows=3),
    # SmolLM2-135M's shape, the student of a real 8B -> 135M-class job, one micro-batch of 8k tokens.
    "gpu": dict(device="cuda", rows=8, seq=1024, vocab=49_152, k=64, precisions="fp32,bf16,fp16",
                model=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True),
                warmup=3, window_steps=5, windows=3),
}


def _batch(cfg: dict, device):
    """Tokens, next-token targets (the last of each row carries none), and the teacher's top-k
    log-probs, ids and tail for every loss token, made row by row (they are input, not measured)."""
    import torch

    from kd_ray.core.columns import (
        DOCS,
        TAIL_LSE,
        TARGETS,
        TOKEN_POS,
        TOKENS,
        TOPK_INDICES,
        TOPK_VALUES,
    )
    from kd_ray.losses import topk_compress

    g = torch.Generator().manual_seed(0)
    rows, seq, vocab = cfg["rows"], cfg["seq"], cfg["vocab"]
    tokens = torch.randint(0, vocab, (rows, seq), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    tops = [topk_compress(torch.randn(seq, vocab, generator=g) * 3, cfg["k"], temperatures=1.0, dtype=torch.float16) for _ in range(rows)]
    batch = {TOKENS: tokens, TOKEN_POS: torch.arange(seq).expand(rows, seq).contiguous(), TARGETS: targets,
             DOCS: torch.zeros(rows, seq, dtype=torch.long), TOPK_VALUES: torch.stack([t.values for t in tops]),
             TOPK_INDICES: torch.stack([t.indices.int() for t in tops]), TAIL_LSE: torch.stack([t.tail_lse for t in tops])}
    return {k: v.to(device) for k, v in batch.items()}


def _spec(cfg: dict, precision: str):
    from kd_ray.spec import parse

    return parse({"task": "causal_lm", "run": {"name": "bench"}, "data": {"source": "x.jsonl", "tokenizer": "tok.json"},
                  "student": {"model": "llama", "kwargs": cfg["model"]},
                  "distill": {"temperature": 1.0, "alpha": 0.8, "top_k": cfg["k"]},
                  "train": {"max_steps": 1000, "global_batch_size": cfg["rows"], "micro_batch_size": cfg["rows"],
                            "precision": precision, "use_gpu": cfg["device"] == "cuda"}})


def _steps(kind: str, precision: str, compiled: bool, cfg: dict, device):
    """A fresh student (same seed) and its step function: kind 'plain' or 'kd_ray'."""
    import torch
    import torch.nn.functional as F

    from kd_ray.core.columns import TARGETS, TOKEN_POS, TOKENS
    from kd_ray.models.lm import llama
    from kd_ray.models.precision import autocast, grad_scaler
    from kd_ray.tasks.causal_lm import CausalLM, StudentLM
    from kd_ray.train.optim import make_optimizer, make_scheduler
    from kd_ray.train.step import optimizer_step

    torch.manual_seed(0)
    lm = llama(vocab_size=cfg["vocab"], **cfg["model"])
    model = StudentLM(lm, cfg["vocab"]).to(device)
    task = CausalLM(_spec(cfg, precision))
    opt = {"name": "adamw", "lr": 3e-4, "weight_decay": 0.0, "betas": (0.9, 0.95), "momentum": 0.9}
    optimizer = make_optimizer(model.parameters(), opt, device)
    scheduler = make_scheduler(optimizer, {"warmup_steps": 0, "min_lr_ratio": 1.0}, total_steps=1000)
    scaler = grad_scaler(precision, device)
    run = torch.compile(model) if compiled else model
    if kind == "kd_ray":
        def step(batch):
            terms = task.micro_step(run, batch, task.count(batch), device, scaler)
            optimizer_step(run, optimizer, scheduler, scaler, grad_clip=1.0)
            return terms.loss.detach()
        return step, model
    forward = torch.compile(lm) if compiled else lm

    def plain(batch):
        with autocast(precision, device):
            logits = forward(input_ids=batch[TOKENS], position_ids=batch[TOKEN_POS], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[TARGETS].flatten(), ignore_index=-100)
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(model, optimizer, scheduler, scaler, grad_clip=1.0)
        return loss.detach()
    return plain, model


def measure(kind: str, precision: str, compiled: bool, cfg: dict, batch, device) -> dict:
    import torch

    from kd_ray.core.columns import TARGETS

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    step, model = _steps(kind, precision, compiled, cfg, device)
    tokens = int((batch[TARGETS] >= 0).sum())
    loss = None

    def run(n: int) -> None:
        nonlocal loss
        for _ in range(n):
            loss = step(batch)
        if cuda:
            torch.cuda.synchronize()

    run(cfg["warmup"])
    warm = time.perf_counter() - started
    windows = []
    for _ in range(cfg["windows"]):
        t0 = time.perf_counter()
        run(cfg["window_steps"])
        windows.append(cfg["window_steps"] * tokens / (time.perf_counter() - t0))
    out = {"kind": kind, "precision": precision, "compile": compiled, "tokens_per_second": statistics.median(windows),
           "windows": windows, "warmup_seconds": warm, "final_loss": float(loss)}
    if cuda:
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--precisions", help="comma-separated, e.g. fp32,bf16")
    p.add_argument("--rows", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--windows", type=int)
    p.add_argument("--window-steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--compile", action="store_true", help="also the compiled student, at the last precision")
    p.add_argument("--threads", type=int, help="torch threads (CPU)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch

    cfg = dict(PRESETS[args.preset])
    for key in ("precisions", "rows", "seq", "windows", "window_steps", "warmup"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print("lm_step: --preset gpu needs CUDA", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(cfg["device"])
    precisions = [x for x in cfg["precisions"].split(",") if x]
    batch = _batch(cfg, device)
    plan = [(kind, prec, False) for prec in precisions for kind in ("plain", "kd_ray")]
    if args.compile:
        plan += [(kind, precisions[-1], True) for kind in ("plain", "kd_ray")]
    rows = []
    for kind, prec, compiled in plan:
        try:
            rows.append(measure(kind, prec, compiled, cfg, batch, device))
        except Exception as e:  # one failed row must not lose the others' figures
            rows.append({"kind": kind, "precision": prec, "compile": compiled, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    by = {(r["kind"], r["precision"], r["compile"]): r for r in rows}
    for r in rows:
        tps = r.get("tokens_per_second")
        plain = by.get(("plain", r["precision"], r["compile"]), {}).get("tokens_per_second")
        base = by.get((r["kind"], "fp32", False), {}).get("tokens_per_second")
        r["vs_plain"] = tps / plain if tps and plain else None
        r["vs_fp32"] = tps / base if tps and base else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    m = cfg["model"]
    print(f"LM step on {name}: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, vocab {cfg['vocab']:,}, "
          f"{cfg['rows']} rows x {cfg['seq']} tokens, top-{cfg['k']}")
    print(f"{'row':<12}{'precision':<11}{'compile':<9}{'tokens/s':>12}{'vs plain':>10}{'vs fp32':>9}{'peak MiB':>10}")
    fmt = lambda x, f: format(x, f) if isinstance(x, (int, float)) else "-"  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:<12}{r['precision']:<11}{str(r['compile']):<9}  error: {r['error']}")
            continue
        print(f"{r['kind']:<12}{r['precision']:<11}{str(r['compile']):<9}{r['tokens_per_second']:>12,.0f}"
              f"{fmt(r['vs_plain'], '.2f'):>10}{fmt(r['vs_fp32'], '.2f'):>9}{fmt(r.get('peak_allocated_mib'), ',.0f'):>10}")
    result = {"device": name, "config": cfg, "rows": rows}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
