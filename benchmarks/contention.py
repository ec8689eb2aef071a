#!/usr/bin/env python
"""What a little background CPU load costs a multi-threaded torch training step.

    python benchmarks/contention.py                  # the CPU preset's student, 1 and 2 threads
    python benchmarks/contention.py --load 3x0.10 --load 6x0.05 --json contention.json

On a small CPU machine a Ray job is never alone: Ray's daemons (gcs, raylet, dashboard, agents)
and the small actors of Ray Train and Ray Data (controller, split coordinator, ...) take a few
percent of a core each; throughput.py measures about 0.25 of a core in all on 2 cores. This
script measures, side by side in one run, what such load does to a plain training step of
throughput.py's CPU student (AdamW, cross-entropy, fp32, random inputs), without Ray: the step alone, then with N busy-waiting processes that
each use a DUTY share of a core in 10 ms cycles, for each thread count. torch's intra-op threads
meet at a barrier after every kernel, so when one of them loses its core for a moment the
others wait: a step with as many threads as cores loses more than the load's share.

samples/s is the median of --windows windows of --window-steps steps after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# A background process: busy for DUTY of every 10 ms, asleep for the rest.
LOAD = "import time\nwhile True:\n t = time.perf_counter()\n while time.perf_counter() - t < {busy}: pass\n time.sleep({idle})"


def step_rate(threads: int, args) -> float:
    """samples/s of a plain training step of the CPU preset's student with `threads` torch threads."""
    import torch

    sys.path.insert(0, HERE)
    import bench_models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = bench_models.student(arch="convnet", num_classes=10, in_channels=3, width=args.width, blocks=args.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.window_steps):
            step()
        rates.append(args.window_steps * args.batch_size / (time.perf_counter() - t0))
    return statistics.median(rates)


def with_load(n: int, duty: float, fn):
    procs = [subprocess.Popen([sys.executable, "-c", LOAD.format(busy=duty * 0.01, idle=(1 - duty) * 0.01)]) for _ in range(n)]
    try:
        time.sleep(0.5)
        return fn()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument("--threads", default=f"1,{cpus}" if cpus > 1 else "1", help="comma list of torch thread counts")
    p.add_argument("--load", action="append", help="NxDUTY: N background processes each busy DUTY of a core (default 3x0.10)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--window-steps", type=int, default=40)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alone/loaded pairs per setting, alternated; the medians are reported")
    p.add_argument("--json", help="also write the results to this path")
    args = p.parse_args(argv)
    loads = []
    for text in args.load or ["3x0.10"]:
        n, _, duty = text.partition("x")
        loads.append((int(n), float(duty)))

    print(f"student convnet width {args.width} blocks {args.blocks}, batch {args.batch_size}, {cpus} CPUs; "
          f"{args.rounds} alternated rounds of alone / loaded")
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for n, duty in loads:
            alone, loaded = [], []
            for _ in range(args.rounds):  # alternated, so a drifting host bends both sides alike
                alone.append(step_rate(threads, args))
                loaded.append(with_load(n, duty, lambda: step_rate(threads, args)))
            a, b = statistics.median(alone), statistics.median(loaded)
            rows.append({"threads": threads, "load_processes": n, "load_duty": duty, "load_cores": n * duty,
                         "alone_samples_per_second": a, "loaded_samples_per_second": b, "loaded_vs_alone": b / a,
                         "load_share_of_machine": n * duty / cpus})
            print(f"  {threads} thread(s), load {n} x {duty:.0%} = {n * duty:.2f} cores: alone {a:,.0f}, loaded {b:,.0f} samples/s", flush=True)

    head = ("threads", "background load", "alone samples/s", "loaded samples/s", "loaded / alone", "load / machine")
    table = [(str(r["threads"]), f"{r['load_processes']} x {r['load_duty']:.0%} = {r['load_cores']:.2f} cores",
              f"{r['alone_samples_per_second']:,.0f}", f"{r['loaded_samples_per_second']:,.0f}",
              f"{r['loaded_vs_alone']:.2f}x", f"{r['load_share_of_machine']:.0%}") for r in rows]
    widths = [max(len(x[i]) for x in table + [head]) for i in range(len(head))]
    print()
    for line in [head, tuple("-" * w for w in widths)] + table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    blob = {"benchmark": "kd_ray contention", "cpus": cpus, "rows": rows}
    print("\nJSON:\n" + json.dumps(blob, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(blob, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
