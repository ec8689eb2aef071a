"""What a kd_ray run did, measured from outside: its process tree's memory and CPU (from /proc),
its timed windows (from its progress lines), and what its teacher actor did around the student's
steps (from the forward hooks of bench_models.py)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import threading
import time

ROLE_ORDER = ["driver (kd-ray CLI)", "train worker", "teacher actor", "train controller",
              "other Ray workers (data tasks, idle)", "Ray system (gcs, raylet, dashboard, agents)", "other"]



# ---------------------------------------------------------------------------------------------
# Processes: role, memory, CPU


def _role(pid: int, root: int, cmd: str) -> str:
    if pid == root:
        return ROLE_ORDER[0]
    if "RayTrainWorker" in cmd:
        return ROLE_ORDER[1]
    if "TeacherPredictor" in cmd or "ReadingTeacher" in cmd:  # a pool actor: kd_ray.teacher's two classes
        return ROLE_ORDER[2]
    if "TrainController" in cmd:
        return ROLE_ORDER[3]
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return ROLE_ORDER[4]
    if any(s in cmd for s in ("gcs_server", "raylet", "dashboard", "agent", "log_monitor", "monitor.py")):
        return ROLE_ORDER[5]
    return ROLE_ORDER[6]


def pss_kb(pid: int) -> int:
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
            self.max_total_rss_kb = max(self.max_total_rss_kb, sum(self._poll_process(p) for p in tree))
            if time.time() - last_pss > 2.0:
                # PSS splits shared pages (torch's libraries, the object store) between the
                # processes that map them: the tree's physical footprint, unlike summed RSS.
                last_pss = time.time()
                self.max_total_pss_kb = max(self.max_total_pss_kb, sum(pss_kb(p.pid) for p in tree))
            if self.gpu and time.time() - last_gpu > 2.0 and shutil.which("nvidia-smi"):
                last_gpu = time.time()
                self._poll_gpu()
            self.stop.wait(self.interval)

    def _poll_process(self, p) -> int:
        """Records one process's peak RSS, role and CPU time; returns its RSS in KiB (0 if it is gone)."""
        import psutil

        try:
            hwm, rss = _proc_status(p.pid)
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except (OSError, psutil.Error):
            return 0
        role = _role(p.pid, self.root_pid, cmd)
        # Ray names a worker process after the task or actor it runs now ("ray::IDLE" between tasks)
        label = cmd.split()[0] if role == ROLE_ORDER[4] and cmd.startswith("ray::") else None
        self.cpu.setdefault(p.pid, []).append((time.time(), t.user + t.system, label))
        rec = self.procs.setdefault(p.pid, {"hwm_kb": 0, "role": ROLE_ORDER[-1], "cmd": cmd})
        rec["hwm_kb"] = max(rec["hwm_kb"], hwm)
        if ROLE_ORDER.index(role) < ROLE_ORDER.index(rec["role"]):
            rec["role"], rec["cmd"] = role, cmd
        return rss

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
        tasks' ray::MapBatches(read_chunks), ...): each interval between two polls counts for the name
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


def read_probe(path: str, procs: dict, root: int) -> list[dict]:
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
            rec["process"] = ROLE_ORDER[0] if rec["pid"] == root else procs.get(rec["pid"], {}).get("role", "?")
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# Timed windows from the run's metrics.jsonl


def train_records(run_dir: str) -> list[dict]:
    """The run's train records (kd_ray.run.metrics: each logged window once, restarts resolved)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("kind") == "train"]


def _progress_reports(records: list[dict]) -> list[dict]:
    """One report per train record: the steps of its window and their duration, as the worker timed them."""
    return [{"steps": r["window_steps"], "end": r["step"], "seconds": r["window_seconds"], "wait": r["data_wait_seconds"]}
            for r in records if r.get("window_steps") and r.get("window_seconds")]


def kd_windows(records: list[dict], warmup_steps: int, window_steps: int, global_batch: int) -> list[dict]:
    """Windows of >= window_steps steps after the warm-up, from the run's train records;
    consecutive records (an epoch end adds an extra one) are merged until a window holds
    window_steps steps."""
    windows, acc = [], None
    for r in _progress_reports(records):
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


def cores_in_windows(windows: list[dict], records: list[dict], monitor: TreeMonitor) -> dict | None:
    """Cores by role between the wall times (the driver's, as it received them) of the train
    records that open and close the timed windows."""
    if not windows:
        return None
    at_step = {r["step"]: r["time"] for r in records}
    t0, t1 = at_step.get(windows[0]["end"] - windows[0]["steps"]), at_step.get(windows[-1]["end"])
    if t0 and t1 and t1 > t0:
        return monitor.cpu_by_role(t0, t1)
    return None


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


def _not_steady(all_windows: list[dict], timeline: dict | None, windows_median: float) -> str | None:
    """Why the windows only drained the teacher's head start, or None when they did not."""
    if not timeline or not timeline.get("teacher_rate_busy"):
        return None
    idle = all(w.get("teacher_busy_fraction", 1.0) < 0.2 for w in all_windows)
    if not idle or timeline["teacher_rate_busy"] >= 0.9 * windows_median:
        return None
    return (f"the teacher ran ahead of the student ({timeline['teacher_rows_before_first_step']:,} samples ready "
            f"before the first step) and was idle in every timed window, so they measure the student draining that "
            f"queue; the teacher actor's own rate was {timeline['teacher_rate_busy']:,.0f} samples per busy second, "
            f"so the steady state is at most that. The table shows the data path's rate from the teacher's first "
            f"forward to the last step instead")


def choose_kd_rate(all_windows: list[dict], timeline: dict | None, batch: int, pool: bool = True) -> dict:
    """kd_ray's samples/s for the table, and how it was measured.

    - not steady (CPU timeline): the teacher was idle in every window and is slower than them, so
      the windows only drained its head start: report the data path's rate instead;
    - bursty: some windows wait for data (> 20% of their time) and some hardly at all (< 5%): the
      teacher's output arrives in large blocks, and a median would pick one side; report all
      windows together (samples / seconds);
    - otherwise the median of the windows kept by steady_windows (`pool`: a teacher pool that
      could run ahead; without one, every window is kept: its data wait is the worker's own reading)."""
    if not all_windows:
        return {}
    waits = [w["data_wait_fraction"] for w in all_windows]
    out: dict = {"windows_median_samples_per_second": statistics.median(w["samples_per_second"] for w in all_windows),
                 "timed_aggregate_samples_per_second": sum(w["steps"] for w in all_windows) * batch / sum(w["seconds"] for w in all_windows),
                 "data_wait_fraction": statistics.median(waits)}
    reason = _not_steady(all_windows, timeline, out["windows_median_samples_per_second"])
    if reason:
        out.update(not_steady=reason, samples_per_second=timeline["pipeline_samples_per_second"], windows_samples_per_second=[],
                   measured_as="teacher's first forward to the student's last step (timed windows not steady)")
        return out
    if max(waits) > 0.2 and min(waits) < 0.05:
        out.update(samples_per_second=out["timed_aggregate_samples_per_second"],
                   windows_samples_per_second=[w["samples_per_second"] for w in all_windows], bursty=True,
                   measured_as="all timed windows together (bursty: data arrives in large blocks, a median would mislead)")
        return out
    kept, dropped = steady_windows(all_windows) if pool else (all_windows, 0)
    out.update(samples_per_second=statistics.median(w["samples_per_second"] for w in kept),
               windows_samples_per_second=[w["samples_per_second"] for w in kept], head_start_windows_dropped=dropped,
               measured_as="median of windows from progress lines")
    return out


# ---------------------------------------------------------------------------------------------
# The pipeline's timeline, from the forward hooks


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
    _teacher_in_windows(windows, student, teacher, batch)
    return out


def _teacher_in_windows(windows: list[dict], student: list, teacher: list, batch: int) -> None:
    """Adds to each window the teacher's busy share and its queue when the window began."""
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
