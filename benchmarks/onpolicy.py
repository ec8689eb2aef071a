#!/usr/bin/env python
"""The on-policy quickstart (jobs/lm_onpolicy.yaml), side by side in one run.

    python benchmarks/onpolicy.py                          # staleness 0 and 1, then on- vs off-policy, seeds 0 and 1
    python benchmarks/onpolicy.py --skip compare --steps 40 --json out.json

Needs the quickstart's off-policy student of each seed first: seed 0 is the job's own warm start,
    kd-ray cache jobs/lm_quickstart_offline.yaml && kd-ray run jobs/lm_quickstart_offline.yaml
and seed S (its own held-out chapters, so its own capture):
    kd-ray cache jobs/lm_quickstart_offline.yaml run.seed=S teacher.cache.path=../runs/lm_quickstart_cache_sS
    kd-ray run jobs/lm_quickstart_offline.yaml run.seed=S teacher.cache.path=../runs/lm_quickstart_cache_sS run.name=lm_quickstart_offline_sS

1. Overlap: the quickstart at onpolicy.max_staleness 0 (generation and training alternate) and
   1 (the next step's rollouts are generated while this one trains), the same steps: the run's
   seconds per step past its first log window (train.log_every steps), rollout tokens/s, training tokens/s, and the share
   of the time the trainer waited for its rows and the rollout actors for weights.
2. What on-policy buys: the quickstart (on-policy, reverse KL) against the same budget continued
   off-policy (onpolicy.fraction 0, forward KL on the rows' own text, as the LM quickstart
   distilled it), half on-policy (fraction 0.5) and the sampled-token loss, for each seed, each
   from that seed's quickstart student: the student's reverse KL to the teacher on its own samples
   of held-out prompts (over the teacher's top-64 + tail, and its sampled estimate), the teacher's
   NLL of those samples, and perplexity on held-out text.
Runs go one after another (the machine's cores are the measurement); each is `kd-ray run`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "lm_onpolicy.yaml")


def run(name: str, workdir: str, overrides: list[str]) -> dict:
    """One `kd-ray run` of the quickstart under `workdir`; its summary and the wall time of its steps."""
    cmd = [sys.executable, "-m", "kd_ray", "run", JOB, f"run.name={name}", f"run.storage_path={workdir}", "--fresh", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.load(open(os.path.join(workdir, name, "summary.json")))
    metrics = [json.loads(line) for line in open(os.path.join(workdir, name, "metrics.jsonl"))]
    steady = [m for m in metrics if m["kind"] == "train" and not m.get("startup")]  # past the first log window
    norms = sorted(m["grad_norm"] for m in metrics if m["kind"] == "train" and m.get("grad_norm") is not None)
    return {"summary": summary, "steps_seconds": sum(m["window_seconds"] for m in steady),
            "steps": sum(m["window_steps"] for m in steady), "median_grad_norm": norms[len(norms) // 2] if norms else None}


def overlap(workdir: str, steps: int) -> dict:
    out = {}
    for staleness in (0, 1):
        r = run(f"staleness{staleness}", workdir, [f"onpolicy.max_staleness={staleness}", f"train.max_steps={steps}", "onpolicy.samples=0"])
        t, s = r["summary"]["telemetry"], r["summary"]
        out[staleness] = {"seconds_per_step": r["steps_seconds"] / r["steps"], "rollout_tokens_per_second": t["rollouts"]["tokens_per_second"],
                          "train_tokens_per_second": s["tokens_per_second"], "trainer_wait_fraction": t["data_wait_fraction"],
                          "rollout_wait_fraction": t["rollouts"]["wait_fraction"], "rollout_busy_fraction": t["rollouts"]["busy_fraction"],
                          "staleness_mean": t["rollouts"]["staleness_mean"]}
    out["speedup"] = out[0]["seconds_per_step"] / out[1]["seconds_per_step"]
    return out


MODES = {"on-policy": [], "off-policy": ["onpolicy.fraction=0", "distill.loss=forward_kl"], "half-on-policy": ["onpolicy.fraction=0.5"],
         "sampled-token": ["distill.loss=sampled_token", "distill.alpha=1.0"]}


def warm_start(seed: int) -> list[str]:
    """The override that starts a run of `seed` from that seed's quickstart student (seed 0: the job's own)."""
    if seed == 0:
        return []
    path = os.path.join(ROOT, "runs", f"lm_quickstart_offline_s{seed}", "student", "model.safetensors")
    if not os.path.exists(path):
        raise SystemExit(f"no quickstart student of seed {seed} at {path}: make it first (this script's docstring says how)")
    return [f"student.weights={path}"]


def compare(workdir: str, seeds: list[int], steps: int | None, modes: list[str]) -> dict:
    budget = [f"train.max_steps={steps}"] if steps else []
    out = {}
    for seed in seeds:
        for mode in modes:
            r = run(f"{mode}-seed{seed}", workdir, [f"run.seed={seed}", *warm_start(seed), *budget, *MODES[mode]])
            s = r["summary"]
            out[f"{mode} seed {seed}"] = {**{k: s["student"].get(k) for k in ("reverse_kl", "sampled_kl", "teacher_nll", "perplexity")},
                                          "median_grad_norm": r["median_grad_norm"], "wall_seconds": s["wall_seconds"]}
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of each overlap run")
    ap.add_argument("--compare-steps", type=int, default=None, help="steps of each comparison run (default: the job's)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--modes", default=",".join(MODES), help=f"the comparison's runs, of: {', '.join(MODES)}")
    ap.add_argument("--skip", choices=["overlap", "compare"], default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    host = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "amx": bool(torch.cpu._is_amx_tile_supported()),
            "cores": os.cpu_count()}
    print(f"host: {host['cores']} cores, torch CPU capability {host['cpu_capability']}, AMX {host['amx']}")
    results: dict = {"host": host}
    with tempfile.TemporaryDirectory(prefix="kd_ray_onpolicy_") as workdir:
        if args.skip != "overlap":
            o = results["overlap"] = overlap(workdir, args.steps)
            print(f"\noverlap, {args.steps} steps of jobs/lm_onpolicy.yaml:")
            print(f"{'max_staleness':>14} {'s/step':>8} {'rollout tok/s':>14} {'train tok/s':>12} {'trainer waits':>14} "
                  f"{'rollouts wait':>14} {'rollouts busy':>14} {'staleness':>10}")
            for k in (0, 1):
                r = o[k]
                print(f"{k:>14} {r['seconds_per_step']:>8.2f} {r['rollout_tokens_per_second']:>14,.0f} {r['train_tokens_per_second']:>12,.0f} "
                      f"{100 * r['trainer_wait_fraction']:>13.0f}% {100 * r['rollout_wait_fraction']:>13.0f}% "
                      f"{100 * r['rollout_busy_fraction']:>13.0f}% {r['staleness_mean']:>10.2f}")
            print(f"max_staleness 1 is {o['speedup']:.2f}x as fast as 0")
        if args.skip != "compare":
            c = results["compare"] = compare(workdir, [int(s) for s in args.seeds.split(",")], args.compare_steps, args.modes.split(","))
            print("\nthe student on its own samples of held-out prompts (per token), after the same budget:")
            print(f"{'run':>24} {'reverse KL':>11} {'sampled KL':>11} {'teacher NLL':>12} {'perplexity':>11} {'grad norm':>10} {'wall s':>7}")
            for name, r in c.items():
                print(f"{name:>24} {r['reverse_kl']:>11.4f} {r['sampled_kl']:>11.4f} {r['teacher_nll']:>12.4f} {r['perplexity']:>11.2f} "
                      f"{r['median_grad_norm']:>10.2f} {r['wall_seconds']:>7.0f}")
    print("\n" + json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
