#!/usr/bin/env python
"""Side-by-side distillation throughput: one synthetic workload, every mode, one invocation.

    python benchmarks/throughput.py                      # --preset cpu: a few minutes on 2 cores
    python benchmarks/throughput.py --preset gpu --ladder --json gpu.json

Modes (each in a fresh process, so peak RSS and thread settings belong to that mode alone):
  1 student      the student alone, no teacher: the speed limit of any distillation
  2 reference    teacher + student in one process on one device, teacher under inference_mode,
                 Hinton KL(T) + CE: the training step of seed 000, written plainly (no kd_ray code)
  3 kd_ray       the product path: a generated job file + .npz data, `python -m kd_ray run JOB`,
                 teacher in a Ray Data actor pool, student in a Ray Train worker
  4 cached       kd_ray from a teacher-output cache: `python -m kd_ray cache JOB` once (its time
                 is reported apart), then the same job with teacher.mode=cached: no teacher runs
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
import glob
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---------------------------------------------------------------------------------------------
# Workloads

MODES = ("student", "reference", "kd_step", "kd_student", "kd_ray", "cached")  # in the order they run


PRESETS = {
    # 2-core CPU: the teacher costs ~14x the student in FLOPs (measured and printed each run).
    "cpu": dict(
        device="cpu", image=[3, 32, 32], classes=10, rows=4096,
        teacher="convnet:width=48,blocks=3", student="convnet:width=16,blocks=2",
        batch_size=64, warmup=16, window_steps=16, windows=5,
        precision="fp32", channels_last=False, compile=False,
        kd_cpus_per_worker=1, kd_cpus_per_actor=1, kd_timeout=600, kd_warmup_steps=64,
    ),
    # One or more CUDA GPUs: seed 000's anchor workload.
    "gpu": dict(
        device="cuda", image=[3, 224, 224], classes=100, rows=1024,
        teacher="resnet50", student="resnet18",
        batch_size=128, warmup=32, window_steps=16, windows=5,
        precision="bf16", channels_last=True, compile=True,
        kd_cpus_per_worker=4, kd_cpus_per_actor=4, kd_timeout=1800, kd_warmup_steps=192,
    ),
}


def parse_model(text: str, image: list[int], classes: int) -> dict:
    """'convnet:width=48,blocks=3' or 'resnet50' -> kwargs of bench_models.teacher/student."""
    arch, _, rest = text.partition(":")
    kwargs: dict = {"arch": arch, "num_classes": classes, "in_channels": image[0]}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = int(value)
    if arch != "convnet":
        kwargs.pop("in_channels")  # torchvision models take 3-channel images
    return kwargs


# ---------------------------------------------------------------------------------------------
# Child processes: modes 1, 2 and kd_step, one per process


def _amp(precision: str, device):
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def _load_data(cfg: dict, device):
    import numpy as np
    import torch

    with np.load(cfg["train_npz"]) as z:
        x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    b = cfg["batch_size"]
    n = len(x) // b
    x, y = x[: n * b].to(device), y[: n * b].to(device)
    if cfg["channels_last"] and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(n)]


def _models(cfg: dict, device, with_teacher: bool):
    import torch

    sys.path.insert(0, cfg["models_dir"])
    import bench_models
    from safetensors.torch import load_file

    torch.manual_seed(cfg["seed"])
    student = bench_models.student(**cfg["student"]).to(device)
    teacher = None
    if with_teacher:
        teacher = bench_models.teacher(**cfg["teacher"])
        teacher.load_state_dict(load_file(cfg["teacher_weights"]))
        teacher.eval().requires_grad_(False).to(device)
    if cfg["channels_last"]:
        student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    return student, teacher


def _forward_costs(cfg: dict, student, teacher, batch, device) -> dict:
    """FLOPs per sample (torch's FlopCounterMode) and timed eager forward, teacher vs student."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = batch[0]
    out: dict = {}
    student.eval()
    try:
        for name, model in (("teacher", teacher), ("student", student)):
            with torch.inference_mode(), _amp(cfg["precision"], device):
                with FlopCounterMode(display=False) as counter:
                    model(x[:2])
                out[f"{name}_flops_per_sample"] = counter.get_total_flops() / 2
                times = []
                for i in range(cfg["cost_reps"] + 2):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(x)
                    _sync(device)
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                out[f"{name}_forward_ms"] = 1e3 * statistics.median(times)
    finally:
        student.train()
    out["flops_ratio"] = out["teacher_flops_per_sample"] / out["student_flops_per_sample"]
    out["timed_forward_ratio"] = out["teacher_forward_ms"] / out["student_forward_ms"]
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_main(mode: str, cfg: dict, out_path: str) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    batches = _load_data(cfg, device)
    student, teacher = _models(cfg, device, with_teacher=mode in ("reference", "kd_step"))
    result: dict = {"mode": mode, "torch_threads": torch.get_num_threads(), "device": str(device),
                    "precision": cfg["precision"], "channels_last": cfg["channels_last"], "compile": cfg["compile"]}
    if mode == "reference" and cfg.get("measure_cost"):
        result["cost"] = _forward_costs(cfg, student, teacher, batches[0], device)
    if cfg["compile"]:
        student = torch.compile(student)
        teacher = torch.compile(teacher) if teacher is not None else None

    T, alpha, precision = cfg["temperature"], cfg["alpha"], cfg["precision"]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}  # what kd_ray picks too
    last_loss: list = [None]

    if mode == "kd_step":
        # kd_ray's own step functions, with the teacher in this process instead of a Ray pool.
        from kd_ray.data import TEACHER, X, Y
        from kd_ray.train.optim import make_optimizer, make_scheduler
        from kd_ray.train.precision import grad_scaler
        from kd_ray.train.step import micro_step, optimizer_step

        opt = make_optimizer(student.parameters(), {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01,
                                                    "betas": (0.9, 0.999), "momentum": 0.9}, device)
        sched = make_scheduler(opt, {"warmup_steps": 0, "min_lr_ratio": 0.0}, 10**9)
        scaler = grad_scaler(precision, device)

        def step(x, y):
            with torch.inference_mode(), _amp(precision, device):
                t_logits = teacher(x)
            terms = micro_step(student, {X: x, Y: y, TEACHER: t_logits}, temperature=T, alpha=alpha,
                               denominator=len(y), precision=precision, device=device, scaler=scaler, sync=True)
            optimizer_step(student, opt, sched, scaler, grad_clip=1.0)
            last_loss[0] = terms.loss
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01, **fast)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

        def step(x, y):
            # Seed 000's reference step (accumulation 1): teacher under inference_mode, student
            # under autocast, Hinton KL(T) x T^2 mixed with CE, (scaled) backward, clip, step.
            opt.zero_grad(set_to_none=True)
            if teacher is not None:
                with torch.inference_mode(), _amp(precision, device):
                    t_logits = teacher(x)
            with _amp(precision, device):
                s_logits = student(x)
                hard = F.cross_entropy(s_logits, y)
                if teacher is not None:
                    soft = F.kl_div(F.log_softmax(s_logits / T, dim=1), F.softmax(t_logits / T, dim=1),
                                    reduction="batchmean") * (T * T)
                    loss = alpha * soft + (1 - alpha) * hard
                else:
                    loss = hard
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm=1.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm=1.0)
                opt.step()
            last_loss[0] = loss.detach()

    student.train()
    it = 0

    def next_batch():
        nonlocal it
        b = batches[it % len(batches)]
        it += 1
        return b

    t_start = time.perf_counter()
    for _ in range(cfg["warmup"]):
        step(*next_batch())
    _sync(device)
    result["warmup_seconds"] = time.perf_counter() - t_start
    windows = []
    for _ in range(cfg["windows"]):
        t0 = time.perf_counter()
        for _ in range(cfg["window_steps"]):
            step(*next_batch())
        _sync(device)
        windows.append(cfg["window_steps"] * cfg["batch_size"] / (time.perf_counter() - t0))
    result["windows_samples_per_second"] = windows
    result["samples_per_second"] = statistics.median(windows)
    result["final_loss"] = float(last_loss[0])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result["pss_at_end_mb"] = _pss_kb(os.getpid()) / 1024  # comparable with kd_ray's tree PSS
    if device.type == "cuda":
        result["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        # PyTorch's defaults, recorded: "fp32" convolutions may run as TF32 on Ampere and later.
        result["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        result["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    with open(out_path, "w") as f:
        json.dump(result, f)


def run_child(mode: str, cfg: dict, workdir: str, overrides: dict | None = None, tag: str = "") -> dict:
    cfg = {**cfg, **(overrides or {})}
    name = f"{mode}{tag}"
    cfg_path, out_path = os.path.join(workdir, f"{name}.cfg.json"), os.path.join(workdir, f"{name}.out.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    started = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", mode, "--_config", cfg_path, "--_out", out_path],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - started
    if proc.returncode != 0 or not os.path.exists(out_path):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        return {"mode": mode, "error": f"exit {proc.returncode}", "log_tail": tail, "wall_seconds": wall}
    with open(out_path) as f:
        result = json.load(f)
    result["wall_seconds"] = wall
    return result


# ---------------------------------------------------------------------------------------------
# Mode 3: kd_ray online, as a user runs it


ROLE_ORDER = ["driver (kd-ray CLI)", "train worker", "teacher actor", "train controller",
              "other Ray workers (data tasks, idle)", "Ray system (gcs, raylet, dashboard, agents)", "other"]


def _role(pid: int, root: int, cmd: str) -> str:
    if pid == root:
        return ROLE_ORDER[0]
    if "RayTrainWorker" in cmd:
        return ROLE_ORDER[1]
    if "TeacherPredictor" in cmd:
        return ROLE_ORDER[2]
    if "TrainController" in cmd:
        return ROLE_ORDER[3]
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return ROLE_ORDER[4]
    if any(s in cmd for s in ("gcs_server", "raylet", "dashboard", "agent", "log_monitor", "monitor.py")):
        return ROLE_ORDER[5]
    return ROLE_ORDER[6]


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _proc_status(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in KiB: VmHWM is the kernel's own peak RSS of the process."""
    hwm = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return hwm, rss


class TreeMonitor(threading.Thread):
    """Polls the kd-ray process and all its descendants (Ray's gcs/raylet and every worker and
    actor are started under the embedded driver): per process its peak RSS (VmHWM, read again
    until the process exits) and role, plus the largest simultaneous RSS sum of the tree."""

    def __init__(self, root_pid: int, interval: float, gpu: bool):
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.gpu = root_pid, interval, gpu
        self.procs: dict[int, dict] = {}
        self.max_total_rss_kb = 0
        self.max_total_pss_kb = 0
        self.gpu_mb: dict[int, float] = {}
        # pid -> [(wall time, CPU seconds user + system, what a Ray worker ran)], one per poll:
        # what each role burnt in the timed windows (cpu_by_role)
        self.cpu: dict[int, list[tuple[float, float, str | None]]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        last_gpu = last_pss = 0.0
        while not self.stop.is_set():
            try:
                root = psutil.Process(self.root_pid)
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for p in tree:
                try:
                    hwm, rss = _proc_status(p.pid)
                    cmd = " ".join(p.cmdline())
                    t = p.cpu_times()
                except (OSError, psutil.Error):
                    continue
                role = _role(p.pid, self.root_pid, cmd)
                # Ray names a worker process after the task or actor it runs now ("ray::IDLE" between tasks)
                label = cmd.split()[0] if role == ROLE_ORDER[4] and cmd.startswith("ray::") else None
                self.cpu.setdefault(p.pid, []).append((time.time(), t.user + t.system, label))
                rec = self.procs.setdefault(p.pid, {"hwm_kb": 0, "role": ROLE_ORDER[-1], "cmd": cmd})
                rec["hwm_kb"] = max(rec["hwm_kb"], hwm)
                if ROLE_ORDER.index(role) < ROLE_ORDER.index(rec["role"]):
                    rec["role"], rec["cmd"] = role, cmd
                total += rss
            self.max_total_rss_kb = max(self.max_total_rss_kb, total)
            if time.time() - last_pss > 2.0:
                # PSS splits shared pages (torch's libraries, the object store) between the
                # processes that map them: the tree's physical footprint, unlike summed RSS.
                last_pss = time.time()
                self.max_total_pss_kb = max(self.max_total_pss_kb, sum(_pss_kb(p.pid) for p in tree))
            if self.gpu and time.time() - last_gpu > 2.0 and shutil.which("nvidia-smi"):
                last_gpu = time.time()
                self._poll_gpu()
            self.stop.wait(self.interval)

    def _poll_gpu(self) -> None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.strip().splitlines():
            try:
                pid, mb = (s.strip() for s in line.split(","))
                self.gpu_mb[int(pid)] = max(self.gpu_mb.get(int(pid), 0.0), float(mb))
            except ValueError:
                continue

    def cpu_by_role(self, t0: float, t1: float) -> dict[str, float]:
        """Cores each role used on average between wall times t0 and t1 (CPU seconds / seconds).
        Ray's other worker processes are named by what they ran (ray::SplitCoordinator, the read
        tasks' ray::MapBatches(_emit), ...): each interval between two polls counts for the name
        at its end, so the names are approximate for processes that switch tasks quickly."""
        out: dict[str, float] = {}
        for pid, samples in self.cpu.items():
            role = self.procs.get(pid, {}).get("role", ROLE_ORDER[-1])
            prev = None
            for ts, c, label in samples:
                if prev is not None and t0 < ts <= t1 and c > prev:
                    key = label or role
                    out[key] = out.get(key, 0.0) + (c - prev) / (t1 - t0)
                prev = c
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self) -> dict:
        roles: dict[str, dict] = {}
        for pid, rec in self.procs.items():
            r = roles.setdefault(rec["role"], {"processes": 0, "max_peak_rss_mb": 0.0, "sum_peak_rss_mb": 0.0, "gpu_mb": 0.0})
            mb = rec["hwm_kb"] / 1024
            r["processes"] += 1
            r["max_peak_rss_mb"] = max(r["max_peak_rss_mb"], mb)
            r["sum_peak_rss_mb"] += mb
            r["gpu_mb"] = max(r["gpu_mb"], self.gpu_mb.get(pid, 0.0))
        ordered = {k: roles[k] for k in ROLE_ORDER if k in roles}
        return {"by_role": ordered, "max_simultaneous_tree_rss_mb": self.max_total_rss_kb / 1024,
                "max_simultaneous_tree_pss_mb": self.max_total_pss_kb / 1024,
                "processes_seen": len(self.procs)}


TRAIN_LINE = re.compile(r"step (\d+)/(\d+)\s.*?([\d.]+) samples/s\s+(?:step \S+ ms\s+)?data wait ([\d.]+)s")


def kd_windows(lines: list[str], warmup_steps: int, window_steps: int, global_batch: int) -> list[dict]:
    """Windows of >= window_steps steps after the warm-up, from kd_ray's progress lines.

    Each line reports samples/s over the steps since the previous line, so its duration is
    steps x global batch / rate; consecutive lines (an epoch end adds an extra one) are merged
    until a window holds window_steps steps."""
    reports = []
    prev = 0
    for line in lines:
        m = TRAIN_LINE.search(line)
        if not m:
            continue
        step, rate, wait = int(m.group(1)), float(m.group(3)), float(m.group(4))
        if step > prev and rate > 0:
            reports.append({"steps": step - prev, "end": step, "seconds": (step - prev) * global_batch / rate, "wait": wait})
        prev = step
    windows, acc = [], None
    for r in reports:
        if r["end"] - r["steps"] < warmup_steps:
            continue  # the window starts inside the warm-up (the first one also holds the start-up)
        acc = acc or {"steps": 0, "seconds": 0.0, "wait": 0.0}
        for k in ("steps", "seconds", "wait"):
            acc[k] += r[k]
        if acc["steps"] >= window_steps:
            acc["end"] = r["end"]
            acc["samples_per_second"] = acc["steps"] * global_batch / acc["seconds"]
            acc["data_wait_fraction"] = acc["wait"] / acc["seconds"]
            windows.append(acc)
            acc = None
    return windows


def steady_windows(windows: list[dict], threshold: float = 0.05) -> tuple[list[dict], int]:
    """Drop the windows that drained a head start.

    The teacher pool starts with the run and fills a queue of ready batches while the student
    worker is still starting, so a teacher-bound pipeline shows windows at student speed with no
    data wait before it settles into waiting every window. If a later window waits for data
    (> threshold of its time), the zero-wait windows before the first such window are dropped,
    when at least two windows remain. Returns (windows kept, windows dropped)."""
    first = next((i for i, w in enumerate(windows) if w["data_wait_fraction"] > threshold), None)
    if first and len(windows) - first >= 2:
        return windows[first:], first
    return windows, 0


def choose_kd_rate(all_windows: list[dict], timeline: dict | None, batch: int) -> dict:
    """kd_ray's samples/s for the table, and how it was measured.

    - not steady (CPU timeline): the teacher was idle in every window and is slower than them, so
      the windows only drained its head start: report the data path's rate instead;
    - bursty: some windows wait for data (> 20% of their time) and some hardly at all (< 5%): the
      teacher's output arrives in large blocks, and a median would pick one side; report all
      windows together (samples / seconds);
    - otherwise the median of the windows kept by steady_windows."""
    if not all_windows:
        return {}
    together = lambda ws: sum(w["steps"] for w in ws) * batch / sum(w["seconds"] for w in ws)  # noqa: E731
    waits = [w["data_wait_fraction"] for w in all_windows]
    out: dict = {"windows_median_samples_per_second": statistics.median(w["samples_per_second"] for w in all_windows),
                 "timed_aggregate_samples_per_second": together(all_windows),
                 "data_wait_fraction": statistics.median(waits)}
    if timeline and timeline.get("teacher_rate_busy"):
        idle = all(w.get("teacher_busy_fraction", 1.0) < 0.2 for w in all_windows)
        if idle and timeline["teacher_rate_busy"] < 0.9 * out["windows_median_samples_per_second"]:
            out["not_steady"] = (
                f"the teacher ran ahead of the student ({timeline['teacher_rows_before_first_step']:,} samples ready "
                f"before the first step) and was idle in every timed window, so they measure the student draining that "
                f"queue; the teacher actor's own rate was {timeline['teacher_rate_busy']:,.0f} samples per busy second, "
                f"so the steady state is at most that. The table shows the data path's rate from the teacher's first "
                f"forward to the last step instead")
            out.update(samples_per_second=timeline["pipeline_samples_per_second"], windows_samples_per_second=[],
                       measured_as="teacher's first forward to the student's last step (timed windows not steady)")
            return out
    if max(waits) > 0.2 and min(waits) < 0.05:
        out.update(samples_per_second=out["timed_aggregate_samples_per_second"],
                   windows_samples_per_second=[w["samples_per_second"] for w in all_windows], bursty=True,
                   measured_as="all timed windows together (bursty: data arrives in large blocks, a median would mislead)")
        return out
    kept, dropped = steady_windows(all_windows)
    out.update(samples_per_second=statistics.median(w["samples_per_second"] for w in kept),
               windows_samples_per_second=[w["samples_per_second"] for w in kept], head_start_windows_dropped=dropped,
               measured_as="median of windows from progress lines")
    return out


def _read_forwards(workdir: str) -> dict[tuple[str, int], list[tuple[float, float, int, int]]]:
    out = {}
    for path in glob.glob(os.path.join(workdir, "forward_*_*.log")):
        role, pid = os.path.basename(path)[len("forward_"):-len(".log")].rsplit("_", 1)
        rows = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4:
                    rows.append((float(parts[0]), float(parts[1]), int(parts[2]), int(parts[3])))
        out[(role, int(pid))] = sorted(rows)
    return out


def _busy(intervals, start: float, end: float) -> float:
    return sum(max(0.0, min(t1, end) - max(t0, start)) for t0, t1, *_ in intervals)


def pipeline_timeline(workdir: str, windows: list[dict], batch: int, driver_pid: int) -> dict | None:
    """What kd_ray's teacher actor did around the student's steps, from the forward hooks.

    Student step k (one worker, no accumulation) is the k-th training-mode forward of the train
    worker. The teacher of the training pool is the teacher process with the latest forward (the
    driver scores the teacher on the eval split first, with a pool of its own). For each window:
    the share of its time the teacher spent in forward, and how many samples the teacher had
    finished beyond what the student had started (its queue) when the window began."""
    forwards = _read_forwards(workdir)
    student = sorted(r for (role, pid), rows in forwards.items() if role == "student" and pid != driver_pid for r in rows if r[3] == 1)
    teachers = {pid: rows for (role, pid), rows in forwards.items() if role == "teacher" and pid != driver_pid and rows}
    if not student or not teachers:
        return None
    teacher = teachers[max(teachers, key=lambda p: teachers[p][-1][1])]
    rows = sum(r[2] for r in teacher)
    busy = sum(r[1] - r[0] for r in teacher)
    first_step = student[0][0]
    out = {
        "student_training_forwards": len(student),
        "teacher_forwards": len(teacher),
        "teacher_samples": rows,
        "teacher_rate_busy": rows / busy if busy > 0 else None,
        "teacher_rows_before_first_step": sum(r[2] for r in teacher if r[1] <= first_step),
        "teacher_first_forward_before_first_step_s": first_step - teacher[0][0],
        "teacher_last_forward_after_first_step_s": teacher[-1][1] - first_step,
        "teacher_first_forward_at": teacher[0][0], "student_first_step_at": first_step, "teacher_last_forward_at": teacher[-1][1],
        # The whole data path once it is up (Ray, worker and actor start-up excluded): every sample
        # the student trained on, over the time from the teacher's first forward to the last step.
        "pipeline_samples_per_second": len(student) * batch / (student[-1][1] - teacher[0][0]),
    }
    for w in windows:
        s, e = w["end"] - w["steps"], w["end"]
        if s >= len(student):
            continue
        t0 = student[s][0]
        t1 = student[e][0] if e < len(student) else student[-1][1]
        if t1 <= t0:
            continue
        w["teacher_busy_fraction"] = _busy(teacher, t0, t1) / (t1 - t0)
        w["teacher_queue_at_start"] = sum(r[2] for r in teacher if r[1] <= t0) - s * batch
    return out


def write_job(cfg: dict, workdir: str, args, teacher: bool = True) -> tuple[str, int]:
    """The benchmark's job file (job.yaml; job_student.yaml without the teacher and the
    distillation loss: the student alone through kd_ray) and its warm-up steps."""
    import yaml

    # Longer than modes 1-2: the first window holds the pipeline's start-up, and the teacher pool
    # gets a head start while the student worker starts, which the next windows drain at student
    # speed (see steady_windows and pipeline_timeline).
    warm_windows = max(2, math.ceil(max(cfg["warmup"], args.kd_warmup_steps) / cfg["window_steps"]))
    kd_warmup = warm_windows * cfg["window_steps"]
    use_gpu = cfg["device"] == "cuda"
    teacher_pool = {"min_actors": 1, "max_actors": 1, "cpus_per_actor": args.kd_cpus_per_actor,
                    "gpus_per_actor": args.kd_gpus_per_actor if use_gpu else 0,
                    "batch_size": args.kd_teacher_batch or cfg["batch_size"]}
    train: dict = {
        "max_steps": kd_warmup + cfg["windows"] * cfg["window_steps"],
        "global_batch_size": cfg["batch_size"], "micro_batch_size": cfg["batch_size"],
        "num_workers": 1, "cpus_per_worker": args.kd_cpus_per_worker, "use_gpu": use_gpu,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 0}, "grad_clip": 1.0,
        "precision": cfg["precision"], "compile": "default" if cfg["compile"] else None,
        "log_every": cfg["window_steps"],
    }
    if use_gpu and args.kd_gpus_per_worker != 1:
        train["resources_per_worker"] = {"GPU": args.kd_gpus_per_worker}
    job = {
        "run": {"name": "throughput", "storage_path": "runs", "seed": cfg["seed"]},
        "data": {"source": "train.npz", "eval_source": "eval.npz", "features": "x", "labels": "y",
                 "num_classes": cfg["classes"]},
        "teacher": {"model": "bench_models:teacher", "kwargs": cfg["teacher"], "weights": "teacher.safetensors",
                    "pool": teacher_pool, "precision": cfg["precision"], "compile": cfg["compile"],
                    "logits_dtype": "float32", "cache": {"path": "teacher_cache", "format": "full", "dtype": "float32"}},
        "student": {"model": "bench_models:student", "kwargs": cfg["student"]},
        "distill": {"loss": "hinton", "temperature": cfg["temperature"], "alpha": cfg["alpha"]},
        "train": train,
        "checkpoint": {"keep": 1},
        "eval": {"every_epochs": 0, "batch_size": 512},
    }
    if not teacher:
        del job["teacher"], job["distill"]
    path = os.path.join(workdir, "job.yaml" if teacher else "job_student.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    return path, kd_warmup


def _kd_env() -> tuple[dict, list[str], str | None]:
    """The environment of a kd-ray command: an embedded Ray of its own. Returns (env, notes, a
    temporary Ray directory to remove afterwards)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    notes = []
    own_ray_tmp = None
    # kd_ray's embedded Ray starts the dashboard (Train V2 polls its state API); on a loaded small
    # machine its modules can miss Ray's 30 s start-up deadline and the run dies before training.
    # Start-up only: it changes nothing in the timed windows.
    env.setdefault("RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT", "180")
    ray_tmp = os.path.join(env.get("RAY_TMPDIR", env.get("TMPDIR", "/tmp")), "ray")
    if os.path.exists(os.path.join(ray_tmp, "ray_current_cluster")):
        # ray.init() with no address joins the last `ray start` cluster it finds there (a test
        # session's, say), and kd_ray's embedded init then fails: give the run its own temp dir.
        env["RAY_TMPDIR"] = own_ray_tmp = tempfile.mkdtemp(prefix="kdr", dir="/tmp")  # short: Ray's socket paths
        notes.append(f"a `ray start` cluster is registered in {ray_tmp}; kd-ray ran with RAY_TMPDIR={env['RAY_TMPDIR']}")
    return env, notes, own_ray_tmp


def capture_cache(cfg: dict, workdir: str, args) -> dict:
    """Mode 4's set-up, timed apart: `python -m kd_ray cache JOB` writes the teacher's outputs."""
    job_path, _ = write_job(cfg, workdir, args)
    env, notes, own_ray_tmp = _kd_env()
    cmd = [sys.executable, "-m", "kd_ray", "cache", job_path]
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.kd_timeout)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(cmd, "timed out", e.stdout or "", e.stderr or "")
    wall = time.time() - started
    if own_ray_tmp:
        shutil.rmtree(own_ray_tmp, ignore_errors=True)
    out = {"command": " ".join(["python", "-m", *cmd[2:]]), "exit_code": proc.returncode, "wall_seconds": wall, "notes": notes}
    m = re.search(r"\(([\d.]+) bytes/sample on disk.*?in ([\d.]+) s, ([\d.]+) samples/s", proc.stdout)
    if m:
        out.update(bytes_per_sample=float(m.group(1)), pool_seconds=float(m.group(2)), samples_per_second=float(m.group(3)))
    if proc.returncode != 0:
        out["error"] = f"exit {proc.returncode}"
        out["log_tail"] = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return out


def run_kd_ray(cfg: dict, workdir: str, args, mode: str = "kd_ray") -> dict:
    """Mode kd_ray (online), cached or kd_student (the student alone through kd_ray: no teacher)."""
    cached = mode == "cached"
    job_path, kd_warmup = write_job(cfg, workdir, args, teacher=mode != "kd_student")
    open(os.path.join(workdir, "THREADS_PROBE"), "w").close()
    for stale in glob.glob(os.path.join(workdir, "forward_*.log")):  # an earlier mode's (or the capture's) forwards
        os.remove(stale)
    # Forward timing hooks: CPU and eager only (CUDA forwards return before the work is done,
    # and a hook that writes a file would break a compiled graph).
    forward_probe = cfg["device"] == "cpu" and not cfg["compile"]
    if forward_probe:
        open(os.path.join(workdir, "FORWARD_PROBE"), "w").close()
    env, notes, own_ray_tmp = _kd_env()
    cmd = [sys.executable, "-m", "kd_ray", "run", job_path] + (["teacher.mode=cached"] if cached else [])
    if mode != "kd_ray":  # no teacher actor on this machine: the student may have the cores mode 1 has
        cmd.append(f"train.cpus_per_worker={args.kd_cpus_per_worker_alone:g}")
    cmd.append("--fresh")
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            cwd=ROOT, env=env, start_new_session=True)
    monitor = TreeMonitor(proc.pid, args.poll_interval, gpu=cfg["device"] == "cuda")
    monitor.start()
    timed_out = threading.Event()

    def kill_on_timeout():
        timed_out.set()
        try:
            os.killpg(proc.pid, 15)  # the session this benchmark started for the run
        except ProcessLookupError:
            pass

    timer = threading.Timer(args.kd_timeout, kill_on_timeout)
    timer.start()
    lines, stamps, times = [], {}, []
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        times.append(time.time())
        if args.verbose:
            print(f"    | {line}", flush=True)
        for key in ("start:", "epoch "):
            if line.startswith(key) and key not in stamps:
                stamps[key] = time.time() - started
    rc = proc.wait()
    timer.cancel()
    if own_ray_tmp:
        shutil.rmtree(own_ray_tmp, ignore_errors=True)
    wall = time.time() - started
    monitor.stop.set()
    monitor.join(timeout=5)
    result: dict = {"mode": mode, "launched_at": started, "command": " ".join(["python", "-m", *cmd[2:]]),
                    "exit_code": rc, "wall_seconds": wall, "job": job_path, "notes": notes,
                    "seconds_to_start_line": stamps.get("start:"), "seconds_to_first_step_report": stamps.get("epoch ")}
    summary_path = os.path.join(workdir, "runs", "throughput", "summary.json")
    summary = {}
    if os.path.exists(summary_path) and os.path.getmtime(summary_path) >= started:  # not an earlier mode's
        with open(summary_path) as f:
            summary = json.load(f)
    result["summary_json"] = {k: summary.get(k) for k in ("status", "steps", "samples", "train_seconds", "wall_seconds", "samples_per_second")}
    result["memory"] = monitor.summary()
    result["threads_probe"] = _read_probe(os.path.join(workdir, "THREADS_PROBE"), monitor.procs, proc.pid)
    if rc != 0 or timed_out.is_set():
        result["error"] = "timed out" if timed_out.is_set() else f"exit {rc}"
        result["log_tail"] = "\n".join(lines[-25:])
    all_windows = kd_windows(lines, kd_warmup, cfg["window_steps"], cfg["batch_size"])
    result["warmup_steps"] = kd_warmup
    result["windows"] = all_windows
    if all_windows:
        # Wall times of the progress lines that open and close the timed windows.
        at_step = {int(m.group(1)): t for ln, t in zip(lines, times) if (m := TRAIN_LINE.search(ln))}
        t0, t1 = at_step.get(all_windows[0]["end"] - all_windows[0]["steps"]), at_step.get(all_windows[-1]["end"])
        if t0 and t1 and t1 > t0:
            result["cores_by_role_in_windows"] = monitor.cpu_by_role(t0, t1)
    timeline = pipeline_timeline(workdir, all_windows, cfg["batch_size"], proc.pid) if forward_probe else None
    if timeline:
        for key in ("teacher_first_forward", "student_first_step", "teacher_last_forward"):
            timeline[f"{key}_s_after_launch"] = timeline.pop(f"{key}_at") - started
    result["timeline"] = timeline
    result.update(choose_kd_rate(all_windows, timeline, cfg["batch_size"]))
    if "samples_per_second" not in result and summary.get("samples_per_second"):
        result["samples_per_second"] = summary["samples_per_second"]
        result["measured_as"] = "AGGREGATE from summary.json (no progress lines parsed; includes start-up and warm-up)"
    result["train_lines"] = [ln for ln in lines if TRAIN_LINE.search(ln)]
    return result


def _read_probe(path: str, procs: dict, root: int) -> list[dict]:
    """Which factory ran in which kind of process, with how many torch threads."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rec["process"] = "driver (kd-ray CLI)" if rec["pid"] == root else procs.get(rec["pid"], {}).get("role", "?")
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# Set-up and report


def prepare(cfg: dict, workdir: str) -> None:
    """Synthetic data (train and a small eval split) as .npz, the teacher's weights as
    safetensors, and the model file next to the job."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(cfg["seed"])
    for name, rows in (("train", cfg["rows"]), ("eval", max(cfg["batch_size"], 64))):
        x = rng.standard_normal((rows, *cfg["image"]), dtype=np.float32)
        y = rng.integers(0, cfg["classes"], rows).astype(np.int64)
        np.savez(os.path.join(workdir, f"{name}.npz"), x=x, y=y)
    shutil.copy(os.path.join(HERE, "bench_models.py"), workdir)
    sys.path.insert(0, HERE)
    import bench_models

    torch.manual_seed(cfg["seed"] + 1)
    teacher = bench_models.teacher(**cfg["teacher"])
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, os.path.join(workdir, "teacher.safetensors"))


def ladder(cfg: dict, workdir: str) -> dict:
    import torch

    if cfg["device"] != "cuda" or not torch.cuda.is_available():
        print("\nprecision ladder: needs CUDA (seed 000's ladder is a GPU measurement); skipped")
        return {"skipped": "needs CUDA"}
    amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    rungs = [("fp32 eager", dict(precision="fp32", channels_last=False, compile=False)),
             (f"AMP ({amp})", dict(precision=amp, channels_last=False, compile=False)),
             ("AMP + channels_last", dict(precision=amp, channels_last=True, compile=False)),
             ("AMP + channels_last + compile", dict(precision=amp, channels_last=True, compile=True))]
    out: dict = {}
    print("\nprecision ladder (seed 000: fp32 1.00, AMP ~2.5x, + channels_last ~2.8x, + compile ~3.5x on A100)")
    print(f"{'rung':<32}{'reference step':>20}{'vs fp32':>9}{'kd_ray step fns':>20}{'vs fp32':>9}")
    base: dict = {}
    for label, over in rungs:
        line = f"{label:<32}"
        for mode in ("reference", "kd_step"):
            r = run_child(mode, cfg, workdir, {**over, "measure_cost": False}, tag="_ladder_" + label.replace(" ", "_").replace("+", "").replace("(", "").replace(")", ""))
            out.setdefault(mode, {})[label] = r
            sps = r.get("samples_per_second")
            if sps and label == rungs[0][0]:
                base[mode] = sps
            ratio = sps / base[mode] if sps and base.get(mode) else None
            r["vs_fp32"] = ratio
            line += f"{_num(sps):>20}{_ratio(ratio):>9}" if sps else f"{'error: ' + r.get('error', '?'):>29}"
        print(line, flush=True)
    return out


def _num(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_table(results: dict, cfg: dict) -> None:
    student = results.get("student", {}).get("samples_per_second")
    reference = results.get("reference", {}).get("samples_per_second")
    rows = []
    labels = {"student": "1 student only (torch)", "reference": "2 reference KD (torch)",
              "kd_step": "  kd_ray step fns, no Ray", "kd_student": "  kd_ray, student alone",
              "kd_ray": "3 kd_ray online",
              "cached": "4 kd_ray cached"}
    for key in MODES:
        if key not in results:
            continue
        r = results[key]
        if "skipped" in r:
            rows.append((labels[key], r["skipped"], "", "", "", "", ""))
            continue
        sps = r.get("samples_per_second")
        win = r.get("windows_samples_per_second") or []
        spread = f"{min(win):,.0f}-{max(win):,.0f}" if win else "-"
        if key in ("kd_student", "kd_ray", "cached"):
            mem = r.get("memory", {}).get("by_role", {})
            peak = f"driver {mem.get('driver (kd-ray CLI)', {}).get('max_peak_rss_mb', 0):,.0f}"
            for role, short in (("train worker", "worker"), ("teacher actor", "teacher")):
                if role in mem:
                    peak += f" + {short} {mem[role]['max_peak_rss_mb']:,.0f}"
            how = r.get("measured_as", "")
            if r.get("not_steady"):
                how = "teacher's 1st forward -> last step: windows NOT STEADY, see below"
            elif r.get("bursty"):
                how = "all windows together: bursty data, see below"
            else:
                how = "median of windows" if how.startswith("median") else (how or r.get("error", ""))
        else:
            peak = f"{r['peak_rss_mb']:,.0f}" if "peak_rss_mb" in r else "-"
            if "peak_cuda_allocated_mb" in r:
                peak += f" (cuda {r['peak_cuda_allocated_mb']:,.0f})"
            how = "median of windows" if sps else r.get("error", "")
        rows.append((labels[key], _num(sps), spread, _ratio(sps / student) if sps and student else "-",
                     _ratio(sps / reference) if sps and reference else "-", peak, how))
    head = ("mode", "samples/s", "windows", "vs student", "vs reference", "peak RSS MB (per process)", "how")
    full = [r for r in rows if not (r[2] == "" and r[3] == "")]  # skipped rows span the line
    widths = [max(len(str(r[i])) for r in full + [head]) for i in range(len(head))]
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        if r[2] == "" and r[3] == "":
            print(f"{str(r[0]).ljust(widths[0])}  {r[1]}")
        else:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def print_details(results: dict, cfg: dict) -> None:
    cost = results.get("reference", {}).get("cost")
    if cost:
        print(f"\nteacher/student forward cost: {cost['flops_ratio']:.1f}x FLOPs "
              f"({cost['teacher_flops_per_sample'] / 1e6:,.1f} vs {cost['student_flops_per_sample'] / 1e6:,.1f} MFLOP/sample), "
              f"{cost['timed_forward_ratio']:.1f}x timed eager forward "
              f"({cost['teacher_forward_ms']:.1f} vs {cost['student_forward_ms']:.1f} ms per batch of {cfg['batch_size']})")
    for key, label in (("kd_student", "student alone"), ("kd_ray", "online"), ("cached", "cached")):
        kd = results.get(key)
        if not kd or "skipped" in kd:
            continue
        s = kd.get("summary_json", {})
        print(f"\nkd_ray {label}: `{kd['command']}`")
        capture = kd.get("capture")
        if capture:
            print(f"  capture, before the run: `{capture['command']}`: {_num(capture.get('samples_per_second'))} samples/s "
                  f"({capture.get('pool_seconds')} s from the pool's start to the last shard, {capture['wall_seconds']:.1f} s with Ray's "
                  f"start), {capture.get('bytes_per_sample')} bytes/sample on disk")
        if s.get("samples_per_second") is not None:
            print(f"  summary.json aggregate (all {s.get('steps')} steps, start-up window and final eval/checkpoint included): "
                  f"{s['samples_per_second']:,.1f} samples/s over {s.get('train_seconds')} s train, {s.get('wall_seconds')} s run")
        if kd.get("windows"):
            print(f"  windows after the {kd['warmup_steps']}-step warm-up (step: samples/s, share of time waiting for data):")
            print("    " + "; ".join(f"{w['end']}: {w['samples_per_second']:,.0f}, {100 * w['data_wait_fraction']:.0f}%" for w in kd["windows"]))
            if kd["windows"] and "teacher_busy_fraction" in kd["windows"][0]:
                print("    teacher actor busy in each window: " + ", ".join(
                    f"{100 * w.get('teacher_busy_fraction', 0):.0f}% (queue {w.get('teacher_queue_at_start', 0):,})" for w in kd["windows"]))
            if kd.get("head_start_windows_dropped"):
                print(f"    the first {kd['head_start_windows_dropped']} drained the teacher's head start (no data wait, later windows wait): not in the median")
            print(f"  median {_num(kd.get('windows_median_samples_per_second'))} samples/s; all windows together {_num(kd.get('timed_aggregate_samples_per_second'))} samples/s; "
                  f"student waited for data {100 * kd['data_wait_fraction']:.0f}% of the time (median window)")
        tl = kd.get("timeline")
        if tl:
            print(f"  teacher actor (forward hooks): {tl['teacher_samples']:,} samples in {tl['teacher_forwards']} forwards, "
                  f"{_num(tl['teacher_rate_busy'])} samples per busy second; it started {tl['teacher_first_forward_before_first_step_s']:.1f} s "
                  f"before the student's first step and had {tl['teacher_rows_before_first_step']:,} samples ready by then")
            print(f"  data path from the teacher's first forward to the student's last step: {tl['pipeline_samples_per_second']:,.1f} samples/s")
        if kd.get("not_steady"):
            print(f"  NOT STEADY: {kd['not_steady']}")
        print(f"  process wall {kd['wall_seconds']:.1f} s; after launch: start line {_num(kd.get('seconds_to_start_line'))} s"
              + (f", teacher's first training forward {tl['teacher_first_forward_s_after_launch']:.1f} s, student's first step "
                 f"{tl['student_first_step_s_after_launch']:.1f} s, teacher's last forward {tl['teacher_last_forward_s_after_launch']:.1f} s" if tl else "")
              + f", first step report {_num(kd.get('seconds_to_first_step_report'))} s")
        cores = kd.get("cores_by_role_in_windows")
        if cores:
            print(f"  cores used in the timed windows (of {os.cpu_count()}), total {sum(cores.values()):.2f}: "
                  + ", ".join(f"{role} {c:.2f}" for role, c in cores.items() if c >= 0.005))
        mem = kd.get("memory", {})
        if mem:
            print(f"  peak RSS by process role ({mem.get('processes_seen')} processes seen; RSS counts shared object-store pages in each):")
            for role, r in mem.get("by_role", {}).items():
                gpu = f", GPU {r['gpu_mb']:,.0f} MB" if r.get("gpu_mb") else ""
                print(f"    {role:<46} {r['processes']:>2} proc  max {r['max_peak_rss_mb']:>7,.0f} MB  sum {r['sum_peak_rss_mb']:>7,.0f} MB{gpu}")
            print(f"    whole tree at its largest: RSS sum {mem.get('max_simultaneous_tree_rss_mb', 0):,.0f} MB, "
                  f"PSS sum {mem.get('max_simultaneous_tree_pss_mb', 0):,.0f} MB (shared pages counted once; sampled every 2 s)")
        probe = {(p["process"], p["role"], p["torch_threads"], p["OMP_NUM_THREADS"]) for p in kd.get("threads_probe", [])}
        if probe:
            print("  torch threads where the models were built: " + "; ".join(
                f"{role} in {proc}: {t} (OMP_NUM_THREADS={omp})" for proc, role, t, omp in sorted(probe)))
        for note in kd.get("notes", []):
            print(f"  note: {note}")
        if kd.get("error"):
            print(f"  ERROR {kd['error']}; last lines:\n" + "\n".join("    " + ln for ln in kd.get("log_tail", "").splitlines()))
    drift = results.get("student", {}).get("drift")
    if drift is not None:
        print(f"\ndrift: mode 1 run again at the end gave {drift:.2f}x its first rate"
              + (" (more than 10% apart: the host's speed changed during the run, so read the ratios with that margin)" if abs(drift - 1) > 0.1 else ""))
    pss = [f"{k} {results[k]['pss_at_end_mb']:,.0f} MB" for k in ("student", "reference", "kd_step") if results.get(k, {}).get("pss_at_end_mb")]
    if pss:
        print(f"\nPSS of the single-process modes at their end (compare with kd_ray's tree PSS): {', '.join(pss)}")
    for key in ("student", "reference", "kd_step"):
        r = results.get(key)
        if r and r.get("error"):
            print(f"\n{key}: ERROR {r['error']}\n{r.get('log_tail', '')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--modes", default="student,reference,kd_ray,cached",
                   help="comma list of " + ", ".join(MODES) + " (default: the four numbered modes; kd_step and kd_student "
                        "split kd_ray's time further)")
    p.add_argument("--teacher", help="bench_models arch, e.g. 'convnet:width=48,blocks=3' or 'resnet50'")
    p.add_argument("--student", help="e.g. 'convnet:width=16,blocks=2' or 'resnet18'")
    p.add_argument("--image", help="sample shape C,H,W, e.g. 3,32,32")
    p.add_argument("--classes", type=int)
    p.add_argument("--rows", type=int, help="training samples in the generated .npz")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=int, help="warm-up steps before the timed windows")
    p.add_argument("--window-steps", type=int, help="steps per timed window (kd_ray: its log_every)")
    p.add_argument("--windows", type=int, help="timed windows; the median is reported")
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
    args = p.parse_args(argv)

    if args._child:
        with open(args._config) as f:
            child_main(args._child, json.load(f), args._out)
        return 0

    t_begin = time.time()
    preset = PRESETS[args.preset]
    image = [int(v) for v in args.image.split(",")] if args.image else preset["image"]
    classes = args.classes or preset["classes"]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cfg = {
        "preset": args.preset, "device": preset["device"], "image": image, "classes": classes,
        "rows": pick("rows"), "batch_size": pick("batch_size"), "warmup": pick("warmup"),
        "window_steps": pick("window_steps"), "windows": pick("windows"), "precision": pick("precision"),
        "channels_last": pick("channels_last"), "compile": pick("compile"), "threads": args.threads or cpus,
        "teacher": parse_model(args.teacher or preset["teacher"], image, classes),
        "student": parse_model(args.student or preset["student"], image, classes),
        "temperature": args.temperature, "alpha": args.alpha, "seed": args.seed, "cost_reps": 10,
    }
    for name in ("kd_cpus_per_worker", "kd_cpus_per_actor", "kd_timeout", "kd_warmup_steps"):
        setattr(args, name, pick(name))
    if args.kd_cpus_per_worker_alone is None:
        args.kd_cpus_per_worker_alone = float(cfg["threads"]) if cfg["device"] == "cpu" else args.kd_cpus_per_worker
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes: {', '.join(sorted(unknown))}")

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

    import ray

    host = {"cpus": cpus, "torch": torch.__version__, "ray": ray.__version__, "python": sys.version.split()[0],
            "gpu": torch.cuda.get_device_name(0) if gpus else None, "load_average_at_start": os.getloadavg()}
    print(f"kd_ray throughput benchmark, preset {args.preset}: {cfg['device']}, {cpus} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}" + (f", {host['gpu']}" if gpus else "") + f"; load average {os.getloadavg()[0]:.2f}")
    print(f"workload: {image} samples, {classes} classes, {cfg['rows']} rows; teacher {cfg['teacher']}; student {cfg['student']}")
    print(f"          batch {cfg['batch_size']}, {cfg['precision']}, channels_last {cfg['channels_last']}, compile {cfg['compile']}; "
          f"warm-up {cfg['warmup']} steps, then {cfg['windows']} windows x {cfg['window_steps']} steps; T={cfg['temperature']} alpha={cfg['alpha']}")
    print(f"threads: modes 1-2 use torch.set_num_threads({cfg['threads']}) in one process; kd_ray runs its own processes "
          f"(online: train worker {args.kd_cpus_per_worker:g} CPU, teacher actor {args.kd_cpus_per_actor:g} CPU; cached and student alone: "
          f"train worker {args.kd_cpus_per_worker_alone:g} CPU; Ray sets their threads, probed below)")
    print(f"work dir: {workdir}", flush=True)
    prepare(cfg, workdir)

    results: dict = {}
    order = [m for m in MODES if m in modes]
    for mode in order:
        load_before = os.getloadavg()[0]
        print(f"[{mode}] running (load average {load_before:.2f}) ...", flush=True)
        if mode == "cached":
            # The capture first, timed apart: a cache is written once, and every run after it trains
            # without the teacher.
            capture = capture_cache(cfg, workdir, args)
            print(f"[cached] capture: {_num(capture.get('samples_per_second'))} samples/s in {capture['wall_seconds']:.1f} s"
                  + (f"  ERROR {capture['error']}" if capture.get("error") else ""), flush=True)
            r = {"mode": "cached", "error": "the capture failed"} if capture.get("error") else run_kd_ray(cfg, workdir, args, "cached")
            r["capture"] = capture
        elif mode in ("kd_ray", "kd_student"):
            r = run_kd_ray(cfg, workdir, args, mode)
        else:
            r = run_child(mode, {**cfg, "measure_cost": mode == "reference"}, workdir)
        r["load_average_before"] = load_before
        results[mode] = r
        print(f"[{mode}] {_num(r.get('samples_per_second'))} samples/s in {r.get('wall_seconds', 0):.1f} s"
              + (f"  ERROR {r['error']}" if r.get("error") else ""), flush=True)

    if "student" in results and results["student"].get("samples_per_second") and len(order) > 1:
        # The machine's own drift over the run: modes run one after another, so a host that got
        # faster or slower between them would bend the ratios. Mode 1 again, at the end, says by how much.
        again = run_child("student", cfg, workdir, tag="_again")
        results["student"]["again_at_end"] = {k: again.get(k) for k in ("samples_per_second", "windows_samples_per_second", "error")}
        if again.get("samples_per_second"):
            results["student"]["drift"] = again["samples_per_second"] / results["student"]["samples_per_second"]
            print(f"[student] again at the end: {_num(again['samples_per_second'])} samples/s "
                  f"({results['student']['drift']:.2f}x the first run: the machine's drift over this invocation)", flush=True)

    print_table(results, cfg)
    print_details(results, cfg)
    ladder_out = ladder(cfg, workdir) if args.ladder else None

    runtime = time.time() - t_begin
    blob = {"benchmark": "kd_ray throughput", "command": " ".join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
            "host": host, "workload": {k: v for k, v in cfg.items() if k not in ("train_npz", "models_dir", "teacher_weights")},
            "kd_ray_resources": {"cpus_per_worker": args.kd_cpus_per_worker, "cpus_per_worker_without_teacher": args.kd_cpus_per_worker_alone,
                                 "cpus_per_actor": args.kd_cpus_per_actor,
                                 "gpus_per_actor": args.kd_gpus_per_actor if cfg["device"] == "cuda" else 0,
                                 "gpus_per_worker": args.kd_gpus_per_worker if cfg["device"] == "cuda" else 0},
            "modes": results, "ladder": ladder_out, "runtime_seconds": runtime}
    student = results.get("student", {}).get("samples_per_second")
    reference = results.get("reference", {}).get("samples_per_second")
    for r in results.values():
        sps = r.get("samples_per_second")
        r["vs_student"] = sps / student if sps and student else None
        r["vs_reference"] = sps / reference if sps and reference else None
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
