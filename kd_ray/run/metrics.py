"""A run's time series: RUN_DIR/metrics.jsonl, one JSON object per line, written as the run goes.

    {"kind": "start", "step": ...}     each (re)start of the worker group: world size, accumulation, resumed step
    {"kind": "teacher", "step": ...}   the teacher on the eval split, scored by each driver before training
    {"kind": "train", "step": ...}     each progress line: every figure it shows (losses, lr, speed, data wait,
                                       the teacher pool's window, elapsed and estimated time left)
    {"kind": "eval", "step": ...}      each evaluation of the student

Every record has `time` (Unix seconds). The progress board (kd_ray.run.console) writes each record
as it arrives, before the trainer's next checkpoint is taken (kd_ray.train.loop waits for it), so
a record is never missing for a step a run resumes from. A (re)start from step S drops the records
past S (those steps are trained again, and their records written again): across failures, resizes
and resumes the file holds each logged step once, in order.

Written through the run directory's filesystem (kd_ray.core.storage): appended where the filesystem
can append (local disks and mounts), rewritten whole where it cannot (object stores).
"""

from __future__ import annotations

import json
import math
from typing import Iterable

from kd_ray.core import storage

METRICS = "metrics.jsonl"
RECORDED = ("start", "teacher", "train", "eval")


def kept_after_restart(records: Iterable[dict], step: int) -> list[dict]:
    """The records that still describe the run once it restarts from `step`."""
    return [r for r in records if r.get("step", 0) <= step]


def parse(text: str) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short (a process killed while writing it), or
    one that is not a record at all (a file edited by hand), is skipped."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("kind"), str):
            out.append(record)
    return out


def read_metrics(run_dir: str) -> list[dict]:
    fs, root = storage.filesystem(run_dir)
    path = f"{root}/{METRICS}"
    try:
        with fs.open_input_stream(path) as f:
            return parse(f.read().decode(errors="replace"))
    except FileNotFoundError:
        return []


def _finite(value):
    """JSON has no NaN or infinity: such a figure is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def as_record(event: dict) -> dict | None:
    """An event of the progress board as the record kept of it, or None for one that is not kept.
    A start's step is the step it resumed from (0 for a fresh one)."""
    if event["kind"] not in RECORDED:
        return None
    return _finite({**event, "step": event["step"] if "step" in event else event.get("resumed_step") or 0})


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl; `restart` drops those a restart supersedes."""

    def __init__(self, run_dir: str):
        self.fs, root = storage.filesystem(run_dir)
        self.fs.create_dir(root, recursive=True)
        self.path = f"{root}/{METRICS}"
        self.appends = not storage.is_remote(run_dir)  # object stores have no append
        data = self._read()
        if data and not data.endswith(b"\n"):  # an earlier writer was killed mid-line: drop that line
            self._rewrite("".join(json.dumps(r) + "\n" for r in parse(data.decode())).encode())

    def write(self, event: dict) -> None:
        record = as_record(event)
        if record is None:
            return
        if record["kind"] == "start":
            self.restart(record["step"])
        line = (json.dumps(record) + "\n").encode()
        if self.appends:
            with self.fs.open_append_stream(self.path) as f:
                f.write(line)
        else:
            self._rewrite(self._read() + line)

    def restart(self, step: int) -> None:
        records = parse(self._read().decode())
        kept = kept_after_restart(records, step)
        if len(kept) < len(records):
            self._rewrite("".join(json.dumps(r) + "\n" for r in kept).encode())

    def _read(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def _rewrite(self, data: bytes) -> None:
        storage.write_whole(self.fs, self.path, data)


# The figures of a record under the names TensorBoard and MLflow show them by (kd_ray.run.tracking).
_TRAIN = {"loss": "train/loss", "kd_loss": "train/kd_loss", "ce_loss": "train/ce_loss", "train_accuracy": "train/accuracy",
          "lr": "train/lr", "grad_norm": "train/grad_norm", "data_wait_seconds": "speed/data_wait_seconds",
          "elapsed_seconds": "time/elapsed_seconds", "eta_seconds": "time/eta_seconds"}
_POOL = {"actors": "teacher_pool/actors", "rows_per_second": "teacher_pool/rows_per_second",
         "busy_fraction": "teacher_pool/busy_fraction"}


def scalars(record: dict) -> dict[str, float]:
    """name -> value of every number a record holds that a chart can show."""
    kind = record["kind"]
    if kind == "train":
        out = {name: record.get(key) for key, name in _TRAIN.items()}
        out[f"speed/{record.get('unit', 'samples')}_per_second"] = record.get("samples_per_second")
        steps = record.get("window_steps") or 0
        if steps:
            out["speed/step_seconds"] = (record["window_seconds"] - record["data_wait_seconds"]) / steps
            out["speed/data_wait_fraction"] = record["data_wait_seconds"] / record["window_seconds"] if record["window_seconds"] else 0.0
        out.update({name: (record.get("teacher_pool") or {}).get(key) for key, name in _POOL.items()})
    elif kind in ("eval", "teacher"):
        prefix = "eval" if kind == "eval" else "teacher"
        out = {f"{prefix}/{k.removeprefix('eval_')}": v for k, v in record.items() if k not in ("step", "epoch", "time", "elapsed_seconds")}
    else:
        out = {"run/world_size": record.get("world_size")}
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
