#!/usr/bin/env python
"""Peak memory of the per-token distillation loss: kd_ray's chunked loss against a naive one.

    python benchmarks/lm_loss_memory.py                    # V=49,152, 2,048 tokens, hidden 576
    python benchmarks/lm_loss_memory.py --tokens 4096 --chunk 512 --json out.json

Both compute alpha x forward KL (over the teacher's top-64 + tail, T=1) + (1 - alpha) x CE for
the same tokens and hidden states, forward and backward:
  naive     the student's full fp32 logits for every token at once (what most recipes hold), then
            the same bucket KL and CE on them
  kd_ray    kd_ray.losses.token_loss: logits made chunk by chunk and recomputed in the backward
            pass (activation checkpointing), so at most `--chunk` tokens' logits exist at a time
Each runs in a fresh process: on CPU the figure is the process's peak RSS during the loss
(forward + backward; VmHWM, reset just before) over its RSS before it, on CUDA torch.cuda.max_memory_allocated over the same span. The
gradients of both are compared, so the two really compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def child(mode: str, args) -> dict:
    import torch

    from kd_ray.losses import (
        TopK,
        bucket_divergence,
        bucket_log_probs,
        mix,
        token_loss,
        topk_compress,
    )

    device = torch.device("cuda" if args.cuda else "cpu")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    teacher = TopK(*(t.to(device) if isinstance(t, torch.Tensor) else t
                     for t in _teacher(args, g, topk_compress)))
    if args.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak()
    if mode == "naive":
        logits = (hidden @ weight.T).float()
        log_p, log_q = bucket_log_probs(logits, teacher, 1.0)
        kd = bucket_divergence(log_p, log_q, "forward").sum()
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        loss = mix(kd, ce, 0.5) / args.tokens
    else:
        loss = token_loss(hidden, lambda h: h @ weight.T, targets, teacher, temperature=1.0, alpha=0.5,
                          denominator=args.tokens, chunk_tokens=args.chunk).loss
    loss.backward()
    peak = (torch.cuda.max_memory_allocated() if args.cuda else _status("VmHWM")) - base
    return {"mode": mode, "peak_bytes": int(peak), "loss": float(loss), "grad_norm": float(hidden.grad.norm() + weight.grad.norm())}


def _teacher(args, g, topk_compress):
    """The teacher's top-k + tail for every token, made in slices (it is input, not measured)."""
    import torch

    parts = [topk_compress(torch.randn(min(256, args.tokens - a), args.vocab, generator=g) * 3, args.k, temperatures=1.0)
             for a in range(0, args.tokens, 256)]
    return (torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts]), torch.cat([p.tail_lse for p in parts]),
            (1.0,))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49_152)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--json")
    p.add_argument("--_child")
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(child(args._child, args)))
        return 0
    rows = []
    for mode in ("naive", "kd_ray"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode] + [a for a in (argv or sys.argv[1:]) if a != "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive, ours = rows
    result = {"vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden, "k": args.k, "chunk": args.chunk,
              "device": "cuda" if args.cuda else "cpu", "naive": naive, "kd_ray": ours,
              "ratio": round(ours["peak_bytes"] / max(naive["peak_bytes"], 1), 4),
              "same_loss": abs(naive["loss"] - ours["loss"]) < 1e-3 * abs(naive["loss"]),
              "same_grads": abs(naive["grad_norm"] - ours["grad_norm"]) < 1e-3 * abs(naive["grad_norm"])}
    print(f"loss peak memory, V={args.vocab:,}, {args.tokens:,} tokens, hidden {args.hidden}, top-{args.k}, {result['device']}")
    print(f"{'mode':<10} {'peak MiB':>10} {'loss':>10}")
    for r in rows:
        print(f"{r['mode']:<10} {r['peak_bytes'] / 2**20:>10.1f} {r['loss']:>10.4f}")
    print(f"kd_ray / naive: {result['ratio']:.3f}x  (same loss: {result['same_loss']}, same gradients: {result['same_grads']})")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
