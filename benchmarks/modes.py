"""Modes 1, 2 and kd_step: the student alone, the reference KD step and kd_ray's step functions,
each in a fresh child process (`throughput.py --_child MODE`), so peak RSS and thread settings
belong to that mode alone; and seed 000's precision ladder over them. kd_ray's own modes are in
kd_runs.py."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from measure import pss_kb
from report import num, ratio
from workloads import HERE, ROOT, amp, build_models, forward_costs, load_batches, sync


def child_main(mode: str, cfg: dict, out_path: str) -> None:
    import torch

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    batches = load_batches(cfg, device)
    student, teacher = build_models(cfg, device, with_teacher=mode in ("reference", "precomputed", "kd_step"))
    result: dict = {"mode": mode, "torch_threads": torch.get_num_threads(), "device": str(device),
                    "precision": cfg["precision"], "channels_last": cfg["channels_last"], "compile": cfg["compile"]}
    if mode == "reference" and cfg.get("measure_cost"):
        # Before torch.compile: the cost reported is that of eager forwards.
        result["cost"] = forward_costs(cfg, student, teacher, batches[0], device)
    if cfg["compile"]:
        student = torch.compile(student)
        teacher = torch.compile(teacher) if teacher is not None else None
    if mode == "precomputed":  # the teacher's logits computed before the clock starts, as a cache holds them
        with torch.no_grad(), amp(cfg["precision"], device):
            batches = [(x, y, teacher(x).float()) for x, y in batches]
        teacher = None
    make_step = _kd_ray_step if mode == "kd_step" else _reference_step
    step = make_step(student, teacher, cfg, device)
    student.train()
    result.update(_timed_windows(step, batches, cfg, device))
    result.update(_memory(device))
    with open(out_path, "w") as f:
        json.dump(result, f)


def _kd_ray_step(student, teacher, cfg: dict, device):
    """kd_ray's own step functions, with the teacher in this process instead of a Ray pool."""
    import torch

    # Every kd_ray name the benchmark uses, in one place.
    from kd_ray.core.columns import TEACHER, X, Y
    from kd_ray.models.precision import grad_scaler
    from kd_ray.tasks.classify import micro_step
    from kd_ray.train.optim import make_optimizer, make_scheduler
    from kd_ray.train.step import optimizer_step

    T, alpha, precision = cfg["temperature"], cfg["alpha"], cfg["precision"]
    opt = make_optimizer(student.parameters(), {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01,
                                                "betas": (0.9, 0.999), "momentum": 0.9}, device)
    sched = make_scheduler(opt, {"warmup_steps": 0, "min_lr_ratio": 0.0}, 10**9)
    scaler = grad_scaler(precision, device)

    def step(x, y):
        with torch.inference_mode(), amp(precision, device):
            t_logits = teacher(x)
        terms = micro_step(student, {X: x, Y: y, TEACHER: t_logits}, temperature=T, alpha=alpha,
                           denominator=len(y), precision=precision, device=device, scaler=scaler)
        optimizer_step(student, opt, sched, scaler, grad_clip=1.0)
        return terms.loss

    return step


def _reference_step(student, teacher, cfg: dict, device):
    """Seed 000's reference step (accumulation 1); without a teacher, mode 1's plain step, or the
    same KD step from logits given with each batch (the precomputed mode)."""
    import torch
    import torch.nn.functional as F

    T, alpha, precision = cfg["temperature"], cfg["alpha"], cfg["precision"]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}  # what kd_ray picks too
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01, **fast)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(x, y, t_logits=None):
        # Teacher under inference_mode, student under autocast, Hinton KL(T) x T^2 mixed with
        # CE, (scaled) backward, clip, step.
        opt.zero_grad(set_to_none=True)
        if teacher is not None:
            with torch.inference_mode(), amp(precision, device):
                t_logits = teacher(x)
        with amp(precision, device):
            s_logits = student(x)
            hard = F.cross_entropy(s_logits, y)
            if t_logits is not None:
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
        return loss.detach()

    return step


def _timed_windows(step, batches: list, cfg: dict, device) -> dict:
    """The warm-up, then the timed windows, cycling through the batches."""
    out: dict = {}
    it = 0
    loss = None

    def run(steps: int) -> None:
        nonlocal it, loss
        for _ in range(steps):
            loss = step(*batches[it % len(batches)])
            it += 1
        sync(device)  # CUDA returns before the work is done

    t_start = time.perf_counter()
    run(cfg["warmup"])
    out["warmup_seconds"] = time.perf_counter() - t_start
    windows = []
    for _ in range(cfg["windows"]):
        t0 = time.perf_counter()
        run(cfg["window_steps"])
        windows.append(cfg["window_steps"] * cfg["batch_size"] / (time.perf_counter() - t0))
    out["windows_samples_per_second"] = windows
    out["samples_per_second"] = statistics.median(windows)
    out["final_loss"] = float(loss)
    return out


def _memory(device) -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
           "pss_at_end_mb": pss_kb(os.getpid()) / 1024}  # comparable with kd_ray's tree PSS
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        # PyTorch's defaults, recorded: "fp32" convolutions may run as TF32 on Ampere and later.
        out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


def log_tail(proc, lines: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


def run_child(mode: str, cfg: dict, workdir: str, overrides: dict | None = None, tag: str = "") -> dict:
    cfg = {**cfg, **(overrides or {})}
    name = f"{mode}{tag}"
    cfg_path, out_path = os.path.join(workdir, f"{name}.cfg.json"), os.path.join(workdir, f"{name}.out.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    started = time.time()
    # A fresh process, so peak RSS and thread settings belong to this mode alone.
    proc = subprocess.run([sys.executable, os.path.join(HERE, "throughput.py"), "--_child", mode, "--_config", cfg_path, "--_out", out_path],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - started
    if proc.returncode != 0 or not os.path.exists(out_path):
        return {"mode": mode, "error": f"exit {proc.returncode}", "log_tail": log_tail(proc), "wall_seconds": wall}
    with open(out_path) as f:
        result = json.load(f)
    result["wall_seconds"] = wall
    return result


def ladder(cfg: dict, workdir: str) -> dict:
    import torch

    if cfg["device"] != "cuda" or not torch.cuda.is_available():
        print("\nprecision ladder: needs CUDA (seed 000's ladder is a GPU measurement); skipped")
        return {"skipped": "needs CUDA"}
    amp_dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    rungs = [("fp32 eager", dict(precision="fp32", channels_last=False, compile=False)),
             (f"AMP ({amp_dtype})", dict(precision=amp_dtype, channels_last=False, compile=False)),
             ("AMP + channels_last", dict(precision=amp_dtype, channels_last=True, compile=False)),
             ("AMP + channels_last + compile", dict(precision=amp_dtype, channels_last=True, compile=True))]
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
            vs_fp32 = sps / base[mode] if sps and base.get(mode) else None
            r["vs_fp32"] = vs_fp32
            line += f"{num(sps):>20}{ratio(vs_fp32):>9}" if sps else f"{'error: ' + r.get('error', '?'):>29}"
        print(line, flush=True)
    return out
