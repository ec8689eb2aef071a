"""What a run leaves to watch it by, without Ray: metrics.jsonl across restarts, TensorBoard events
read back with TensorBoard's own reader, an MLflow file store read back with MlflowClient, the
pictures, and the progress line's clock and teacher figures. Real runs: test_end_to_end (MLflow,
TensorBoard, the picture and a quiet console) and test_fault_tolerance (metrics across resumes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, digits_job

from kd_ray.run.console import duration, format_event
from kd_ray.run.metrics import METRICS, MetricsLog, read_metrics, scalars
from kd_ray.telemetry import pool_finished, seconds_per_step


def train(step, loss=1.0, startup=False, **more):
    return {"kind": "train", "step": step, "epoch": step / 10, "total_steps": 40, "loss": loss, "kd_loss": loss + 0.1,
            "ce_loss": loss - 0.1, "train_accuracy": 0.5, "lr": 1e-3, "grad_norm": 1.0, "samples_per_second": 500.0,
            "unit": "samples", "data_wait_seconds": 0.1, "window_seconds": 1.0, "window_steps": 10, "samples": 64 * step,
            "startup": startup, "time": 1e9 + step, "elapsed_seconds": float(step), **more}


def start(step, world=2, elapsed=0.0):
    return {"kind": "start", "world_size": world, "accumulation": 4 // world, "total_steps": 40, "steps_per_epoch": 10.0,
            "resumed_step": step or None, "position": 64 * step, "time": 1e9, "elapsed_seconds": elapsed}


# A run: start, steps 10 and 20, a worker dies at 25 and the group restarts from the step-10
# checkpoint at another size; then a new driver resumes from 30.
LIFE = [start(0), {"kind": "teacher", "step": 0, "accuracy": 0.96, "loss": 0.2}, train(10, startup=True), train(20),
        start(10, world=1, elapsed=30.0), train(20, 0.8), train(30, 0.7),
        {"kind": "eval", "step": 30, "epoch": 3, "eval_accuracy": 0.9, "eval_loss": 0.3, "eval_samples": 300},
        start(30, world=1, elapsed=5.0), train(40, 0.6, startup=True)]


def test_metrics_hold_each_logged_step_once_across_restarts(tmp_path):
    log = MetricsLog(str(tmp_path))
    for e in LIFE:
        log.write(e)
    log.write({"kind": "done", "step": 40})  # not a record
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"kind": "train", "step": 4')  # a record cut short by a kill
    records = read_metrics(str(tmp_path))
    assert [(r["kind"], r["step"]) for r in records] == [
        ("start", 0), ("teacher", 0), ("train", 10), ("start", 10), ("train", 20), ("train", 30), ("eval", 30),
        ("start", 30), ("train", 40)]
    assert [r["loss"] for r in records if r["kind"] == "train"] == [1.0, 0.8, 0.7, 0.6]  # the attempts that count
    log = MetricsLog(str(tmp_path))  # the next driver: its records start on a line of their own
    log.write(start(30))
    assert read_metrics(str(tmp_path))[-1]["kind"] == "start" and len(read_metrics(str(tmp_path))) == 9


def test_scalars_name_every_figure():
    s = scalars({**train(10), "teacher_pool": {"actors": 1, "rows_per_second": 900.0, "busy_fraction": 0.5, "done": True}})
    assert s["train/loss"] == 1.0 and s["train/kd_loss"] == 1.1 and s["speed/samples_per_second"] == 500.0
    assert s["speed/step_seconds"] == pytest.approx(0.09) and s["speed/data_wait_fraction"] == pytest.approx(0.1)
    assert s["teacher_pool/actors"] == 1.0 and s["time/elapsed_seconds"] == 10.0
    assert scalars(LIFE[7]) == {"eval/accuracy": 0.9, "eval/loss": 0.3, "eval/samples": 300.0}
    assert scalars(LIFE[1]) == {"teacher/accuracy": 0.96, "teacher/loss": 0.2}


def test_progress_line_clock_and_a_finished_pool():
    pool = {"actors": 0, "rows_per_second": 0.0, "busy_fraction": 0.0,
            **pool_finished({"a": (36_900, 1.0), "b": (0, 0.0)})}
    line = format_event({**train(10), "teacher_pool": pool, "elapsed_seconds": 75.0, "eta_seconds": 3725.0})
    assert line.endswith("teacher: done, 1 actor, 36,900 rows/s while working  1:15 elapsed, ~1:02:05 left"), line
    working = {"actors": 2, "rows_per_second": 1234.0, "busy_fraction": 0.93}
    assert "teacher: 2 actors 1,234 rows/s busy 93%" in format_event({**train(10), "teacher_pool": working})
    assert duration(59.6) == "1:00"
    # the pace: steady windows (evaluations and checkpoints included), else the first without its wait
    assert seconds_per_step([train(10, startup=True)]) == pytest.approx(0.09)
    assert seconds_per_step([train(10, startup=True), {**train(20), "window_seconds": 2.0}]) == pytest.approx(0.2)


def tracked_spec(tmp_path, **logging):
    from kd_ray.checks import validate

    job = digits_job(tmp_path, "watched")
    job["logging"] = logging
    return validate(job, job_dir=str(tmp_path))


def test_tensorboard_events_purge_the_steps_trained_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kd_ray.run.tracking import Trackers

    spec = tracked_spec(tmp_path)
    trackers = Trackers(spec, echo=pytest.fail)
    for e in LIFE:
        trackers.record(e)
    trackers.close({"status": "finished", "run_dir": spec.run_dir})
    events = EventAccumulator(os.path.join(spec.run_dir, "tensorboard")).Reload()
    loss = [(s.step, s.value) for s in events.Scalars("train/loss")]
    assert loss == [(10, 1.0), (20, pytest.approx(0.8)), (30, pytest.approx(0.7)), (40, pytest.approx(0.6))]
    assert [s.value for s in events.Scalars("eval/accuracy")] == [pytest.approx(0.9)]
    assert "teacher/accuracy" in events.Tags()["scalars"]


def test_tensorboard_events_hold_the_records_a_killed_driver_never_received(tmp_path):
    """The board wrote every record of LIFE to metrics.jsonl, but the first driver was killed
    before it polled step 30's (its events stop at step 20); the driver that resumes writes them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kd_ray.run.tracking import Trackers

    spec = tracked_spec(tmp_path)
    board = MetricsLog(spec.run_dir)
    for e in LIFE:
        board.write(e)
    killed = Trackers(spec, echo=pytest.fail)
    for e in LIFE[:6]:  # up to the second attempt's step 20: never closed
        killed.record(e)
    time.sleep(1.1)  # an event file is named by the second it was opened in (and the pid: the same here)
    resumed = Trackers(spec, echo=pytest.fail)
    for e in LIFE[8:]:  # the new driver's own events: its start at 30, step 40
        resumed.record(e)
    resumed.close({"status": "finished", "run_dir": spec.run_dir})
    events = EventAccumulator(os.path.join(spec.run_dir, "tensorboard")).Reload()
    loss = [(s.step, s.value) for s in events.Scalars("train/loss")]
    assert loss == [(10, 1.0), (20, pytest.approx(0.8)), (30, pytest.approx(0.7)), (40, pytest.approx(0.6))]
    assert [(s.step, s.value) for s in events.Scalars("eval/accuracy")] == [(30, pytest.approx(0.9))]
    assert [s.step for s in events.Scalars("teacher/accuracy")] == [0]


def test_mlflow_file_store_holds_params_metrics_and_the_student(tmp_path):
    from mlflow.tracking import MlflowClient

    from kd_ray.run.tracking import Trackers

    store = tmp_path / "mlruns"
    spec = tracked_spec(tmp_path, tensorboard=False, mlflow={"tracking_uri": str(store), "experiment": "kd tests"})
    trackers = Trackers(spec, echo=pytest.fail)
    for e in LIFE:
        trackers.record(e)
    os.makedirs(spec.run_dir, exist_ok=True)
    for name in ("student.safetensors", "summary.json"):
        (tmp_path / "runs" / "watched" / name).write_text("{}")
    trackers.close({"status": "finished", "run_dir": spec.run_dir})
    run_id = json.load(open(os.path.join(spec.run_dir, "mlflow.json")))["run_id"]

    client = MlflowClient(f"file://{store}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "watched"
    assert client.get_experiment(run.info.experiment_id).name == "kd tests"
    assert run.data.params["train.global_batch_size"] == "64" and run.data.params["run.name"] == "watched"
    assert run.data.params["student.kwargs.hidden"] == "32" and "logging.mlflow.experiment" in run.data.params
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [10, 20, 20, 30, 40]  # MLflow keeps a retried window's first value too
    assert run.data.metrics["eval/accuracy"] == 0.9 and run.data.metrics["teacher/accuracy"] == 0.96
    assert {a.path for a in client.list_artifacts(run_id)} == {"student", "summary.json"}
    assert [a.path for a in client.list_artifacts(run_id, "student")] == ["student/student.safetensors"]
    # A resumed run goes on in the same MLflow run.
    again = Trackers(spec, echo=pytest.fail)
    again.record(start(40, elapsed=1.0))
    again.close({"status": "stopped", "run_dir": spec.run_dir})
    assert client.get_run(run_id).info.status == "KILLED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_asking_for_mlflow_without_it_is_one_line(tmp_path, monkeypatch):
    from kd_ray.core.errors import UserError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with pytest.raises(UserError, match=r"^logging.mlflow: needs MLflow, which is not installed: pip install"):
        tracked_spec(tmp_path, mlflow={"tracking_uri": "http://127.0.0.1:5000"})


def test_report_draws_one_run_and_a_comparison(tmp_path):
    from kd_ray.run.report import draw, restarts

    runs = []
    for name, records in (("kd", LIFE), ("scratch", [start(0), train(10, 1.5, startup=True), train(40, 1.2)])):
        log = MetricsLog(str(tmp_path / name))
        for e in records:
            log.write(e)
        runs.append(str(tmp_path / name))
    assert restarts(read_metrics(runs[0])) == [(10, "resized 2->1"), (30, "resumed")]
    path = draw(runs[:1])
    assert path == os.path.join(runs[0], "report.png") and os.path.getsize(path) > 20_000
    proc = subprocess.run([sys.executable, "-m", "kd_ray", "report", *runs, "--out", str(tmp_path / "both.png")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "both.png"), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kd_ray", "report", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "has no metrics.jsonl" in proc.stderr, proc.stderr
