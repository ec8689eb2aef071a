#!/usr/bin/env python
"""A language model's data at two corpus sizes, side by side in one run: preparing its token
shards (kd_ray.data.token_shards), and a prepared job's start to its first step.

    python benchmarks/lm_data.py                       # corpora of ~3M and ~30M tokens
    python benchmarks/lm_data.py --copies 1,10 --json out.json
    python benchmarks/lm_data.py --no-two-nodes        # skip the preparation on a 2-node cluster

Each corpus is the King James Bible (1,189 chapters, ~0.98M tokens with SmolLM2's tokenizer)
repeated N times under fresh ids, one JSON line a chapter, in one file. For each:
  - `kd-ray prepare JOB` on the embedded Ray: its wall time and the preparation's own time (from
    its console line), in tokens per second per core of the machine;
  - `kd-ray run JOB` of the prepared job (a tiny student, no teacher, 3 steps), twice (a start,
    then a restart under another run name): the time from the command to its first step, and the
    peak RSS of the driver and of every process of its tree (tests of `/proc`, benchmarks/measure.py);
  - the tokenizer's own batch throughput on one core (this process, TOKENIZERS_PARALLELISM off,
    256 chapters a call, the batch call the preparation makes: kd_ray.data.text.Encoder.ids), the
    reference the preparation's per-core rate is held to: measured just before and just after
    each preparation (a pass over the KJV each time), and each preparation held to the mean of
    its two, because on a shared 2-core VM the same pass varies by +-20% over minutes (one
    preparation of KJV x30 took 20.7 s and 27.9 s within half an hour, nothing else running).
The largest corpus is also prepared on a cluster of 2 Ray nodes on this machine (ray's
cluster_utils: two raylets, 2 CPUs each). Figures are extrapolated to 1B and 10B tokens and
printed as extrapolations.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from measure import TreeMonitor  # noqa: E402


def corpus(path: str, copies: int) -> int:
    """The KJV `copies` times, one chapter a JSON line, each under a fresh id; its bytes."""
    from kd_ray.data.text import kjv_chapters

    chapters = kjv_chapters()
    with open(path, "w") as f:
        for c in range(copies):
            for i, ch in enumerate(chapters):
                f.write(json.dumps({"id": c * len(chapters) + i, "text": ch["text"]}) + "\n")
    return os.path.getsize(path)


def job(workdir: str, source: str, prepared: str, name: str) -> str:
    import yaml

    spec = {"task": "causal_lm", "run": {"name": name, "storage_path": os.path.join(workdir, "runs")},
            "data": {"source": source, "text": "text", "id_column": "id", "tokenizer": "smollm2-135m-instruct", "max_seq_len": 256,
                     "eval_split": 0.01, "prepared": prepared},
            "student": {"model": "llama", "kwargs": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}},
            "train": {"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 8, "log_every": 1},
            "eval": {"every_epochs": 0}, "logging": {"report": False}}
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def kd_ray(args: list[str], env: dict | None = None, run_dir: str | None = None) -> dict:
    """`kd-ray ARGS` in a process of its own, its tree watched: wall time, peak RSS by process,
    and (given its run directory) the time its first step ended."""
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "kd_ray", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monitor = TreeMonitor(proc.pid, 0.2, gpu=False)
    monitor.start()
    out, _ = proc.communicate()
    wall = time.time() - started
    monitor.stop.set()
    monitor.join()
    if proc.returncode != 0:
        raise SystemExit(f"kd-ray {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    peaks = {pid: rec["hwm_kb"] / 1024 for pid, rec in monitor.procs.items()}
    first = None
    if run_dir:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f if '"kind": "train"' in line]
        first = min(r["time"] for r in steps) - started
    return {"wall_s": wall, "first_step_s": first, "driver_peak_rss_mb": peaks.get(proc.pid, 0.0),
            "largest_other_peak_rss_mb": max((mb for pid, mb in peaks.items() if pid != proc.pid), default=0.0),
            "tree_peak_rss_mb": monitor.max_total_rss_kb / 1024, "processes": len(peaks), "out": out}


def prepared_seconds(out: str) -> float:
    return float(re.search(r"prepared [\d,]+ tokens .* in ([\d.]+)s", out).group(1))


def tokenizer_rate(sample_chapters: int = 1189) -> float:
    """The tokenizer's own batch encoding, one core, tokens per second."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from kd_ray.data.text import Encoder, kjv_chapters
    from kd_ray.models import lm as lms

    tok = lms.load_tokenizer("smollm2-135m-instruct", None)
    encoder = Encoder(tok.backend_tokenizer, tok.eos_token_id)
    texts = [c["text"] for c in kjv_chapters()[:sample_chapters]]
    encoder.ids(texts[:256])  # warm
    started, tokens = time.perf_counter(), 0
    for a in range(0, len(texts), 256):
        tokens += sum(map(len, encoder.ids(texts[a:a + 256])))
    return tokens / (time.perf_counter() - started)


def two_node_prepare(workdir: str, source: str) -> dict:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        path = job(workdir, source, os.path.join(workdir, "prepared_2nodes"), "two_nodes")
        r = kd_ray(["prepare", path], env={"RAY_ADDRESS": cluster.address})
        return {"wall_s": r["wall_s"], "prepare_s": prepared_seconds(r["out"]), "nodes": 2}
    finally:
        cluster.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", default="3,30", help="corpus sizes, in copies of the KJV (~0.98M tokens each)")
    p.add_argument("--two-nodes", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json")
    args = p.parse_args()
    import torch

    cores = os.cpu_count()
    capability = torch.backends.cpu.get_cpu_capability()
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    references = []
    workdir = tempfile.mkdtemp(prefix="kd_ray_lm_data_")
    results = {"cores": cores, "cpu_capability": capability, "amx": amx, "sizes": []}
    for copies in (int(c) for c in args.copies.split(",")):
        source = os.path.join(workdir, f"kjv_x{copies}.jsonl")
        size = corpus(source, copies)
        prepared = os.path.join(workdir, f"prepared_x{copies}")
        references.append(tokenizer_rate())
        prep = kd_ray(["prepare", job(workdir, source, prepared, f"prep_x{copies}")])
        references.append(tokenizer_rate())
        manifest = json.load(open(next(os.path.join(prepared, d, "manifest.json") for d in os.listdir(prepared))))
        tokens = sum(t["tokens"] for t in manifest["totals"].values())
        disk = sum(t["bytes"] for t in manifest["totals"].values())
        starts = []
        for attempt in ("start", "restart"):
            name = f"run_x{copies}_{attempt}"
            starts.append(kd_ray(["run", job(workdir, source, prepared, name)], run_dir=os.path.join(workdir, "runs", name)))
        row = {"copies": copies, "source_mb": size / 2**20, "tokens": tokens, "pieces": len({f["piece"] for f in manifest["files"]}),
               "shard_mb": disk / 2**20, "shard_bytes_per_token": disk / tokens,
               "prepare_wall_s": prep["wall_s"], "prepare_s": prepared_seconds(prep["out"]),
               "prepare_driver_peak_rss_mb": prep["driver_peak_rss_mb"], "prepare_largest_other_peak_rss_mb": prep["largest_other_peak_rss_mb"],
               "runs": [{k: v for k, v in s.items() if k != "out"} for s in starts]}
        row["prepare_tokens_per_s_per_core"] = tokens / row["prepare_s"] / cores
        row["tokenizer_tokens_per_s_one_core"] = (references[-2] + references[-1]) / 2  # just before and after
        results["sizes"].append(row)
    results["tokenizer_samples"] = references
    if args.two_nodes:
        big = results["sizes"][-1]
        two = two_node_prepare(workdir, os.path.join(workdir, f"kjv_x{big['copies']}.jsonl"))
        two["tokens_per_s"] = big["tokens"] / two["prepare_s"]
        results["two_nodes"] = two
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def report(r: dict) -> None:
    print(f"\nmachine: {r['cores']} cores, torch CPU capability {r['cpu_capability']}, AMX {'yes' if r['amx'] else 'no'}")
    print("tokenizer's own batch encoding, one core, before and after each preparation: "
          + ", ".join(f"{x:,.0f}" for x in r["tokenizer_samples"]) + " tokens/s\n")
    head = ("corpus", "tokens", "pieces", "prepare (s)", "tok/s/core", "vs tokenizer", "prep driver RSS", "first step: start / restart (s)",
            "run driver RSS", "largest other RSS", "tree RSS")
    rows = []
    for s in r["sizes"]:
        a, b = s["runs"]
        rows.append((f"KJV x{s['copies']} ({s['source_mb']:.0f} MB)", f"{s['tokens'] / 1e6:.1f}M", str(s["pieces"]),
                     f"{s['prepare_s']:.1f} ({s['prepare_wall_s']:.0f} wall)", f"{s['prepare_tokens_per_s_per_core']:,.0f}",
                     f"{s['prepare_tokens_per_s_per_core'] / s['tokenizer_tokens_per_s_one_core']:.2f}x "
                     f"(of {s['tokenizer_tokens_per_s_one_core']:,.0f})",
                     f"{s['prepare_driver_peak_rss_mb']:.0f} MB", f"{a['first_step_s']:.1f} / {b['first_step_s']:.1f}",
                     f"{max(a['driver_peak_rss_mb'], b['driver_peak_rss_mb']):.0f} MB",
                     f"{max(a['largest_other_peak_rss_mb'], b['largest_other_peak_rss_mb']):.0f} MB",
                     f"{max(a['tree_peak_rss_mb'], b['tree_peak_rss_mb']):.0f} MB"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    for line in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    small, large = r["sizes"][0], r["sizes"][-1]
    ratio = large["tokens"] / small["tokens"]

    def first(s):
        return max(run["first_step_s"] for run in s["runs"])

    def driver(s):
        return max(run["driver_peak_rss_mb"] for run in s["runs"])

    print(f"\n{ratio:.0f}x the tokens: run driver peak RSS x{driver(large) / driver(small):.2f}, "
          f"time to first step x{first(large) / first(small):.2f} (slowest of start and restart)")
    if "two_nodes" in r:
        t = r["two_nodes"]
        print(f"2 Ray nodes on this machine (2 CPUs each), x{large['copies']}: prepared in {t['prepare_s']:.1f}s "
              f"({t['tokens_per_s']:,.0f} tokens/s; one node: {large['tokens'] / large['prepare_s']:,.0f})")
    rate = large["prepare_tokens_per_s_per_core"]
    per_token = large["shard_bytes_per_token"]
    slope = max(0.0, (first(large) - first(small)) / (large["tokens"] - small["tokens"]))
    print("\nExtrapolated (not measured), from the largest corpus's figures:")
    for tokens in (1e9, 1e10):
        print(f"  {tokens / 1e9:.0f}B tokens: shards {tokens * per_token / 2**30:,.0f} GiB on disk; preparation "
              f"{tokens / rate / 3600:,.1f} core-hours ({tokens / rate / 3600 / 16:,.2f} h on a 16-core node); "
              f"first step {first(large) + slope * (tokens - large['tokens']):,.0f} s after a start "
              f"(the measured slope, {slope * 1e6:.3f} s per million tokens)")


if __name__ == "__main__":
    main()
