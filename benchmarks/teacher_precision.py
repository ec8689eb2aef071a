#!/usr/bin/env python
"""The LM quickstart's teacher forward on one CPU thread, fp32 against bf16, on this CPU as it is
and with oneDNN held to the instruction sets of CPUs without bf16 matrix units (AMX):

    python benchmarks/teacher_precision.py                  # 8 rows x 256 tokens, 3 timed forwards each
    python benchmarks/teacher_precision.py --json out.json

Each (instruction set, precision) runs in a fresh process (ONEDNN_MAX_CPU_ISA is read once, when
oneDNN starts): `native` is the CPU as it is; `avx512_core_bf16` has AVX512 bf16 dot products but
no AMX; `avx512_core` has neither (the 2-core machines whose torch says AVX512 and that lack
AMX). The rows are the quickstart's teacher (SmolLM2-135M-Instruct) over KJV text, as the pool
runs it (kd_ray.tasks.causal_lm: the decoder, then the top-k signal). What `teacher.precision:
auto` picks on this machine is printed too (kd_ray.models.precision.resolve).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ("native", "avx512_core_bf16", "avx512_core")


def child(precision: str, args) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    from kd_ray.checks import load_job
    from kd_ray.core.columns import TARGETS, TOKEN_POS, TOKENS
    from kd_ray.data.text import kjv_chapters
    from kd_ray.data.tokens import make_rows
    from kd_ray.tasks.build import task_for

    torch.set_num_threads(1)
    spec = load_job(os.path.join(ROOT, "jobs", "lm_quickstart.yaml"))
    task = task_for(spec)
    model = task.load_teacher(torch.device("cpu")).eval()
    text = " ".join(c["text"] for c in kjv_chapters()[:8])
    ids = np.asarray(task.tokenizer(text)["input_ids"][: args.rows * args.seq + 1])
    r = make_rows(iter([(ids, np.ones(len(ids), bool))]), args.seq, "pack")
    batch = {TOKENS: r.tokens[: args.rows], TOKEN_POS: r.positions[: args.rows], TARGETS: r.targets[: args.rows]}
    cpu = torch.device("cpu")
    task.teacher_tensors(model, batch, cpu, precision)  # warm-up: oneDNN's kernels are made on first use
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        task.teacher_tensors(model, batch, cpu, precision)
        times.append(time.perf_counter() - start)
    tokens = int(r.tokens[: args.rows].size)
    return {"tokens_per_second": tokens / min(times), "seconds": min(times), "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    import torch

    sys.path.insert(0, ROOT)
    from kd_ray.models.precision import resolve

    results = []
    for isa in ISAS:
        env = {**os.environ, **({} if isa == "native" else {"ONEDNN_MAX_CPU_ISA": isa.upper()})}
        row = {"isa": isa}
        for precision in ("fp32", "bf16"):
            cmd = [sys.executable, __file__, "--child", precision, "--rows", str(args.rows), "--seq", str(args.seq),
                   "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            row[precision] = json.loads(out.strip().splitlines()[-1])["tokens_per_second"]
        row["bf16_over_fp32"] = row["bf16"] / row["fp32"]
        results.append(row)
    machine = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
               "auto_picks": resolve("auto", torch.device("cpu")), "torch": torch.__version__}
    print(f"SmolLM2-135M teacher forward, {args.rows} x {args.seq} tokens, one thread; "
          f"torch says {machine['cpu_capability']}, AMX {machine['amx']}, auto picks {machine['auto_picks']}")
    print(f"{'oneDNN ISA':<18} {'fp32 tok/s':>11} {'bf16 tok/s':>11} {'bf16/fp32':>10}")
    for r in results:
        print(f"{r['isa']:<18} {r['fp32']:>11.0f} {r['bf16']:>11.0f} {r['bf16_over_fp32']:>9.2f}x")
    blob = {"machine": machine, "config": vars(args), "results": results}
    print(json.dumps(blob))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(blob, f, indent=1)


if __name__ == "__main__":
    main()
