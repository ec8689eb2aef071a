#!/usr/bin/env python
"""Side-by-side distillation throughput: one synthetic workload, every mode, one invocation.

    python benchmarks/throughput.py                      # --preset cpu: a few minutes on 2 cores
    python benchmarks/throughput.py --preset gpu --ladder --json gpu.json
    python benchmarks/throughput.py --preset small --rounds 3     # ratios within each round: steadier on a drifting host

Modes (each in a fresh process, so peak RSS and thread settings belong to that mode alone):
  1 student      the student alone, no teacher: the speed limit of any distillation
  2 reference    teacher + student in one process on one device, teacher under inference_mode,
                 Hinton KL(T) + CE: the training step of seed 000, written plainly (no kd_ray code)
  3 kd_ray       the product path: a generated job file + .npz data, `python -m kd_ray run JOB`,
                 teacher in a Ray Data actor pool, student in a Ray Train worker
  3c colocated   kd_ray with teacher.placement=colocated: the same job, the teacher inside the train
                 worker (no pool; the worker reads its data itself and gets the cores mode 1 has)
  4 cached       kd_ray from a teacher-output cache: `python -m kd_ray cache JOB` once (its time
                 is reported apart), then the same job with teacher.mode=cached: no teacher runs
  (precomputed)  the reference step from teacher logits computed before the clock starts: what
                 training from a cache costs with no kd_ray code (mode 4's plain counterpart)
  (kd_step)      optional (`--modes ...,kd_step`): kd_ray's own micro_step/optimizer_step with the
                 teacher in the same process, without Ray: separates the step from the pipeline
  (kd_student)   optional: the student alone through kd_ray (a job with no teacher): what Ray Train and the
                 data stream cost the student, apart from anything distillation adds. Mode 4
                 against this row is the cost of the cache; this row against mode 1 is the
                 cost of running under Ray on this machine

For each kd_ray mode the benchmark also reports how many cores each process role used during
the timed windows (CPU seconds from /proc): on a small CPU machine, where the student's threads
share the cores with Ray's own processes, that is where the time goes.

samples/s is the median over timed windows after a warm-up. Modes 1-2 time their own windows
(CUDA-synchronised). For kd_ray the windows come from its per-report progress lines (each line
gives samples/s for the steps since the previous one); if none can be parsed, the aggregate of
summary.json is used and the table says so. On CPU, hooks in the benchmark's model file also time
every teacher and student forward inside kd_ray's processes. If the timed windows only drained
a queue that the teacher filled while the student was starting (the teacher idle in all of them),
they measure the student alone: the row then shows the data path's rate from the teacher's
first forward to the student's last step instead, and says so.

`--ladder` (CUDA only) runs seed 000's precision ladder for the reference step and for kd_ray's
step functions: fp32 eager, AMP, AMP + channels_last, AMP + channels_last + compile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported rather than run as a script: the modules below live next to this file
    sys.path.insert(0, HERE)

from kd_runs import capture_cache, run_kd_ray  # noqa: E402
from modes import child_main, ladder, run_child  # noqa: E402
from report import (  # noqa: E402
    num,
    print_details,
    print_header,
    print_rounds,
    print_table,
    print_whole_runs,
    results_blob,
)
from workloads import MODES, PRESETS, parse_model, prepare  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--modes",
                   help="comma list of " + ", ".join(MODES) + " (default: the preset's; for cpu and gpu the numbered "
                        "modes; kd_step and kd_student split kd_ray's time further; a _parquet mode reads a parquet copy of the data)")
    p.add_argument("--teacher", help="bench_models arch, e.g. 'convnet:width=48,blocks=3' or 'resnet50'")
    p.add_argument("--student", help="e.g. 'convnet:width=16,blocks=2' or 'resnet18'")
    p.add_argument("--image", help="sample shape C,H,W, e.g. 3,32,32")
    p.add_argument("--classes", type=int)
    p.add_argument("--rows", type=int, help="training samples in the generated .npz")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=int, help="warm-up steps before the timed windows")
    p.add_argument("--window-steps", type=int, help="steps per timed window (kd_ray: its log_every)")
    p.add_argument("--windows", type=int, help="timed windows; the median is reported")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every mode this many times, in turn (mode 1, 2, ..., then again): the table shows each mode's "
                        "median round, and the ratios are also taken within each round, whose modes ran minutes apart")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, help="torch threads for modes 1, 2 and kd_step (default: the CPUs this process may use)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kd-cpus-per-worker", type=float)
    p.add_argument("--kd-cpus-per-worker-alone", type=float,
                   help="train worker CPUs of the modes without a teacher process (cached, kd_student); default: on CPU "
                        "every usable CPU, as mode 1's threads (no teacher actor needs a core), else --kd-cpus-per-worker")
    p.add_argument("--kd-cpus-per-actor", type=float)
    p.add_argument("--kd-gpus-per-actor", type=float, help="default: 1 with 2+ GPUs, else 0.5 (teacher and student share the GPU)")
    p.add_argument("--kd-gpus-per-worker", type=float, help="default: 1 with 2+ GPUs, else 0.5")
    p.add_argument("--kd-teacher-batch", type=int, help="teacher pool batch size (default: the student's batch)")
    p.add_argument("--kd-timeout", type=float)
    p.add_argument("--kd-warmup-steps", type=int, help="kd_ray steps before its timed windows (default: the preset's; longer than "
                   "--warmup because the teacher pool runs ahead while the student worker starts)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between RSS polls of kd_ray's processes")
    p.add_argument("--ladder", action="store_true", help="also run seed 000's precision ladder (CUDA only)")
    p.add_argument("--json", help="also write the JSON results to this path")
    p.add_argument("--workdir", help="where data, weights and the job go (default: a new temp dir, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the temp work dir")
    p.add_argument("--verbose", action="store_true", help="echo kd-ray's output")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p


def workload_config(args) -> tuple[dict, int]:
    """The workload from the preset and the flags, and the CPUs this process may use. Also fills
    in the kd_ray resource flags left unset."""
    preset = PRESETS[args.preset]
    image = [int(v) for v in args.image.split(",")] if args.image else preset["image"]
    classes = args.classes or preset["classes"]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cfg = {
        "preset": args.preset, "device": preset["device"], "image": image, "classes": classes,
        "rows": pick("rows"), "batch_size": pick("batch_size"), "warmup": pick("warmup"),
        "window_steps": pick("window_steps"), "windows": pick("windows"), "precision": pick("precision"),
        "channels_last": pick("channels_last"), "compile": pick("compile"), "threads": args.threads or preset.get("threads") or cpus,
        "teacher": parse_model(args.teacher or preset["teacher"], image, classes),
        "student": parse_model(args.student or preset["student"], image, classes),
        "temperature": args.temperature, "alpha": args.alpha, "seed": args.seed, "cost_reps": 10,
        "forward_probe": preset.get("forward_probe", True),
    }
    for name in ("kd_cpus_per_worker", "kd_cpus_per_actor", "kd_timeout", "kd_warmup_steps"):
        setattr(args, name, pick(name))
    if args.kd_cpus_per_worker_alone is None:
        args.kd_cpus_per_worker_alone = float(cfg["threads"]) if cfg["device"] == "cpu" else args.kd_cpus_per_worker
    return cfg, cpus


def run_modes(modes: list[str], cfg: dict, workdir: str, args) -> dict:
    order = [m for m in MODES if m in modes]
    rounds: dict = {m: [] for m in order}
    for n in range(args.rounds):
        for mode in order:
            load_before = os.getloadavg()[0]
            tag = f" (round {n + 1} of {args.rounds})" if args.rounds > 1 else ""
            print(f"[{mode}] running{tag} (load average {load_before:.2f}) ...", flush=True)
            r = run_mode(mode, cfg, workdir, args)
            r["load_average_before"] = load_before
            rounds[mode].append(r)
            print(f"[{mode}] {num(r.get('samples_per_second'))} samples/s in {r.get('wall_seconds', 0):.1f} s"
                  + (f"  ERROR {r['error']}" if r.get("error") else ""), flush=True)
    results = {m: median_round(rs) for m, rs in rounds.items()}
    if "cached" in results:  # the capture wrote the cache in the first round; later rounds found it whole
        results["cached"]["capture"] = rounds["cached"][0].get("capture")
    first = rounds["student"][0].get("samples_per_second") if "student" in rounds else None
    if first and len(order) > 1:
        measure_drift(results["student"], first, cfg, workdir)
    return results


def median_round(runs: list[dict]) -> dict:
    """A mode's run of median rate (the lower of the middle two), with every round's rate."""
    rated = sorted((r for r in runs if r.get("samples_per_second")), key=lambda r: r["samples_per_second"])
    pick = rated[(len(rated) - 1) // 2] if rated else runs[-1]
    return {**pick, "rounds_samples_per_second": [r.get("samples_per_second") for r in runs]} if len(runs) > 1 else pick


def run_mode(mode: str, cfg: dict, workdir: str, args) -> dict:
    if mode == "cached":
        # The capture first, timed apart: a cache is written once, and every run after it trains
        # without the teacher.
        capture = capture_cache(cfg, workdir, args)
        print(f"[cached] capture: {num(capture.get('samples_per_second'))} samples/s in {capture['wall_seconds']:.1f} s"
              + (f"  ERROR {capture['error']}" if capture.get("error") else ""), flush=True)
        r = {"mode": "cached", "error": "the capture failed"} if capture.get("error") else run_kd_ray(cfg, workdir, args, "cached")
        r["capture"] = capture
        return r
    if mode.removesuffix("_parquet") in ("kd_ray", "kd_student", "colocated"):
        return run_kd_ray(cfg, workdir, args, mode)
    return run_child(mode, {**cfg, "measure_cost": mode == "reference"}, workdir)


def measure_drift(student: dict, first: float, cfg: dict, workdir: str) -> None:
    """Mode 1 again, at the end, against its first run (`first` samples/s): modes run one after
    another, so a host that got faster or slower between them would bend the ratios; this says by
    how much."""
    again = run_child("student", cfg, workdir, tag="_again")
    student["again_at_end"] = {k: again.get(k) for k in ("samples_per_second", "windows_samples_per_second", "error")}
    if again.get("samples_per_second"):
        student["drift"] = again["samples_per_second"] / first
        print(f"[student] again at the end: {num(again['samples_per_second'])} samples/s "
              f"({student['drift']:.2f}x the first run: the machine's drift over this invocation)", flush=True)


def host_info(cpus: int, gpus: int) -> dict:
    import ray
    import torch

    return {"cpus": cpus, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "ray": ray.__version__, "python": sys.version.split()[0],
            "gpu": torch.cuda.get_device_name(0) if gpus else None, "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args._child:
        with open(args._config) as f:
            child_main(args._child, json.load(f), args._out)
        return 0

    t_begin = time.time()
    cfg, cpus = workload_config(args)
    modes = [m.strip() for m in (args.modes or PRESETS[args.preset].get("modes", "student,reference,kd_ray,colocated,cached")).split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: at least 1")

    import torch

    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print(f"--preset {args.preset} needs CUDA and this machine has none; use --preset cpu", file=sys.stderr)
        if args.ladder:
            print("precision ladder: needs CUDA (seed 000's ladder is a GPU measurement); skipped")
        return 2
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    share = 1.0 if gpus >= 2 else 0.5
    args.kd_gpus_per_actor = args.kd_gpus_per_actor if args.kd_gpus_per_actor is not None else share
    args.kd_gpus_per_worker = args.kd_gpus_per_worker if args.kd_gpus_per_worker is not None else share

    workdir = args.workdir or tempfile.mkdtemp(prefix="kdb_")
    os.makedirs(workdir, exist_ok=True)
    cfg.update(train_npz=os.path.join(workdir, "train.npz"), models_dir=workdir,
               teacher_weights=os.path.join(workdir, "teacher.safetensors"))
    host = host_info(cpus, gpus)
    print_header(args, cfg, host, workdir)
    prepare(cfg, workdir, parquet=any(m.endswith("_parquet") for m in modes))

    results = run_modes(modes, cfg, workdir, args)
    print_table(results, cfg)
    print_whole_runs(results)
    print_rounds(results)
    print_details(results, cfg)
    ladder_out = ladder(cfg, workdir) if args.ladder else None

    runtime = time.time() - t_begin
    blob = results_blob(argv, host, cfg, args, results, ladder_out, runtime)
    print(f"\nruntime {runtime:.0f} s\n\nJSON:")
    text = json.dumps(blob, indent=1, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if not args.workdir and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [m for m, r in results.items() if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
