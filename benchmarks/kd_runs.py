"""kd_ray's modes as a user runs them: a generated job file over the generated .npz, then
`python -m kd_ray run JOB` (online, or teacher.mode=cached after `python -m kd_ray cache JOB`, or
the student alone with job_student.yaml), each on an embedded Ray of its own, watched from outside
(measure.py)."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

from measure import (
    TreeMonitor,
    choose_kd_rate,
    cores_in_windows,
    kd_windows,
    pipeline_timeline,
    read_probe,
    train_records,
)
from modes import log_tail
from workloads import ROOT


def write_job(cfg: dict, workdir: str, args, teacher: bool = True, source: str = "npz") -> tuple[str, int]:
    """The benchmark's job file (job.yaml; job_student.yaml without the teacher and the
    distillation loss: the student alone through kd_ray; `_parquet` in the name with the parquet
    copy of the data as its source) and its warm-up steps."""
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
    job = {
        "run": {"name": "throughput", "storage_path": "runs", "seed": cfg["seed"]},
        "data": {"source": f"train.{source}", "eval_source": f"eval.{source}", "features": "x", "labels": "y",
                 "num_classes": cfg["classes"]},
        "teacher": {"model": "bench_models:teacher", "kwargs": cfg["teacher"], "weights": "teacher.safetensors",
                    "pool": teacher_pool, "precision": cfg["precision"], "compile": cfg["compile"],
                    "logits_dtype": "float32", "cache": {"path": "teacher_cache", "format": "full", "dtype": "float32"}},
        "student": {"model": "bench_models:student", "kwargs": cfg["student"]},
        "distill": {"loss": "hinton", "temperature": cfg["temperature"], "alpha": cfg["alpha"]},
        "train": _train_section(cfg, args, kd_warmup + cfg["windows"] * cfg["window_steps"]),
        "checkpoint": {"keep": 1},
        "eval": {"every_epochs": 0, "batch_size": 512},
    }
    if not teacher:
        del job["teacher"], job["distill"]
    path = os.path.join(workdir, ("job" if teacher else "job_student") + ("_parquet" if source == "parquet" else "") + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    return path, kd_warmup


def _train_section(cfg: dict, args, max_steps: int) -> dict:
    use_gpu = cfg["device"] == "cuda"
    train: dict = {
        "max_steps": max_steps,
        "global_batch_size": cfg["batch_size"], "micro_batch_size": cfg["batch_size"],
        "num_workers": 1, "cpus_per_worker": args.kd_cpus_per_worker, "use_gpu": use_gpu,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 0}, "grad_clip": 1.0,
        "precision": cfg["precision"], "compile": "default" if cfg["compile"] else None,
        "log_every": cfg["window_steps"],  # each progress line closes a timed window
    }
    if use_gpu and args.kd_gpus_per_worker != 1:
        train["resources_per_worker"] = {"GPU": args.kd_gpus_per_worker}
    return train


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


def _shown(cmd: list[str]) -> str:
    """The command as a user types it (`python -m kd_ray ...`), not with this interpreter's path."""
    return " ".join(["python", "-m", *cmd[2:]])


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
    out = {"command": _shown(cmd), "exit_code": proc.returncode, "wall_seconds": wall, "notes": notes}
    m = re.search(r"\(([\d.]+) bytes/sample on disk.*?in ([\d.]+) s, ([\d.]+) samples/s", proc.stdout)
    if m:
        out.update(bytes_per_sample=float(m.group(1)), pool_seconds=float(m.group(2)), samples_per_second=float(m.group(3)))
    if proc.returncode != 0:
        out["error"] = f"exit {proc.returncode}"
        out["log_tail"] = log_tail(proc)
    return out


def run_kd_ray(cfg: dict, workdir: str, args, mode: str = "kd_ray") -> dict:
    """Mode kd_ray (online, the teacher in a pool), colocated (the teacher in the train worker), cached
    or kd_student (the student alone through kd_ray: no teacher);
    kd_ray_parquet and kd_student_parquet read the parquet copy of the data."""
    base = mode.removesuffix("_parquet")
    job_path, kd_warmup = write_job(cfg, workdir, args, teacher=base != "kd_student",
                                    source="parquet" if mode.endswith("_parquet") else "npz")
    forward_probe = _reset_probes(cfg, workdir)
    env, notes, own_ray_tmp = _kd_env()
    cmd = [sys.executable, "-m", "kd_ray", "run", job_path] + {"cached": ["teacher.mode=cached"],
                                                               "colocated": ["teacher.placement=colocated"]}.get(mode, [])
    if base != "kd_ray":  # no teacher actor on this machine: the student (and a colocated teacher) may have the cores mode 1 has
        cmd.append(f"train.cpus_per_worker={args.kd_cpus_per_worker_alone:g}")
    cmd.append("--fresh")
    started = time.time()
    run = _watch(cmd, env, cfg, args, started)
    if own_ray_tmp:
        shutil.rmtree(own_ray_tmp, ignore_errors=True)
    wall = time.time() - started
    run.monitor.stop.set()
    run.monitor.join(timeout=5)
    result: dict = {"mode": mode, "launched_at": started, "command": _shown(cmd),
                    "exit_code": run.rc, "wall_seconds": wall, "job": job_path, "notes": notes,
                    "seconds_to_start_line": run.stamps.get("start:"), "seconds_to_first_step_report": run.stamps.get("epoch ")}
    summary = _read_summary(workdir, started)
    result["summary_json"] = {k: summary.get(k) for k in ("status", "steps", "samples", "train_seconds", "wall_seconds", "samples_per_second")}
    result["memory"] = run.monitor.summary()
    result["threads_probe"] = read_probe(os.path.join(workdir, "THREADS_PROBE"), run.monitor.procs, run.monitor.root_pid)
    if run.rc != 0 or run.timed_out:
        result["error"] = "timed out" if run.timed_out else f"exit {run.rc}"
        result["log_tail"] = "\n".join(run.lines[-25:])
    _measure_windows(result, run, kd_warmup, cfg, workdir, forward_probe, pool=base == "kd_ray")
    if "samples_per_second" not in result and summary.get("samples_per_second"):
        result["samples_per_second"] = summary["samples_per_second"]
        result["measured_as"] = "AGGREGATE from summary.json (no progress lines parsed; includes start-up and warm-up)"
    result["train_records"] = train_records(os.path.join(workdir, "runs", "throughput"))
    return result


def _reset_probes(cfg: dict, workdir: str) -> bool:
    """Arms bench_models' probes for this run; returns whether the forward hooks are on."""
    open(os.path.join(workdir, "THREADS_PROBE"), "w").close()
    for stale in glob.glob(os.path.join(workdir, "forward_*.log")):  # an earlier mode's (or the capture's) forwards
        os.remove(stale)
    # Forward timing hooks: CPU and eager only (CUDA forwards return before the work is done,
    # and a hook that writes a file would break a compiled graph).
    forward_probe = cfg["device"] == "cpu" and not cfg["compile"] and cfg.get("forward_probe", True)
    if forward_probe:
        open(os.path.join(workdir, "FORWARD_PROBE"), "w").close()
    return forward_probe


def _watch(cmd: list[str], env: dict, cfg: dict, args, started: float) -> SimpleNamespace:
    """Runs the kd-ray command, polling its process tree, and keeps its output lines with the wall
    time each arrived at (the timed windows' bounds for the CPU accounting)."""
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
    return SimpleNamespace(rc=rc, monitor=monitor, lines=lines, times=times, stamps=stamps, timed_out=timed_out.is_set())


def _read_summary(workdir: str, started: float) -> dict:
    path = os.path.join(workdir, "runs", "throughput", "summary.json")
    if os.path.exists(path) and os.path.getmtime(path) >= started:  # not an earlier mode's
        with open(path) as f:
            return json.load(f)
    return {}


def _measure_windows(result: dict, run: SimpleNamespace, kd_warmup: int, cfg: dict, workdir: str, forward_probe: bool,
                     pool: bool) -> None:
    """The timed windows, the cores used in them, the teacher's timeline and the rate for the table."""
    records = train_records(os.path.join(workdir, "runs", "throughput"))
    all_windows = kd_windows(records, kd_warmup, cfg["window_steps"], cfg["batch_size"])
    result["warmup_steps"] = kd_warmup
    result["windows"] = all_windows
    cores = cores_in_windows(all_windows, records, run.monitor)
    if cores is not None:
        result["cores_by_role_in_windows"] = cores
    timeline = pipeline_timeline(workdir, all_windows, cfg["batch_size"], run.monitor.root_pid) if forward_probe else None
    if timeline:
        for key in ("teacher_first_forward", "student_first_step", "teacher_last_forward"):
            timeline[f"{key}_s_after_launch"] = timeline.pop(f"{key}_at") - result["launched_at"]
    result["timeline"] = timeline
    result.update(choose_kd_rate(all_windows, timeline, cfg["batch_size"], pool))
