"""End to end on the session's real local Ray cluster: real jobs, real models, real files."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
import ray
import torch
from conftest import ROOT, TEACHER_SPEC, digits_job, kd_job, run_here, write_job

from kd_ray.models.registry import build_model
from kd_ray.models.weights import load_into
from kd_ray.run.console import print_summary

pytestmark = pytest.mark.slow

# The lines kd-ray run prints besides its summary table (kd_ray.job, kd_ray.run.console).
KD_RAY_LINE = re.compile(r"^(kd-ray: run |data: \d+ train |teacher on the eval split: |start: world size |epoch \d+\.\d\d step |"
                         r"eval  after epoch |picture of the run: )")


def write_digits_parquet(path, rows=slice(None)) -> str:
    """The digits (those `rows` of them) as a user's parquet directory: two files, features as
    fixed-length lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x[rows], y[rows]
    path.mkdir()
    half = len(y) // 2
    for i, sl in enumerate((slice(0, half), slice(half, None))):
        table = pa.table({"pixels": pa.array(x[sl].astype(np.float32).tolist(), pa.list_(pa.float32(), 64)), "digit": y[sl]})
        pq.write_table(table, path / f"part-{i}.parquet")
    return str(path)


def read_summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def assert_loadable(summary: dict, floor: float) -> None:
    assert summary["status"] == "finished"
    assert summary["student"]["accuracy"] >= floor, summary
    info = json.load(open(os.path.join(os.path.dirname(summary["student_weights"]), "student.json")))
    model = build_model(info["model"], info["kwargs"])
    load_into(model, summary["student_weights"])  # raises if anything is missing or mis-shaped


def assert_watchable(run_dir, job: dict, summary: dict) -> None:
    """What the run left to watch it by, read back with each tool's own reader: metrics.jsonl,
    TensorBoard's event reader, MLflow's client; and its picture."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kd_ray.run.metrics import read_metrics

    records = read_metrics(str(run_dir))
    trains = [r for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in trains]
    assert steps == sorted(set(steps)) and steps[-1] == summary["steps"]
    assert [r["kind"] for r in records[:2]] == ["teacher", "start"] and records[0]["accuracy"] == summary["teacher"]["accuracy"]
    assert all(r["teacher_pool"]["actors"] >= 0 and r["eta_seconds"] is not None for r in trains[1:])
    assert [r["step"] for r in records if r["kind"] == "eval"][-1] == summary["steps"]
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == steps
    assert events.Scalars("eval/accuracy")[-1].value == pytest.approx(summary["student"]["accuracy"])
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 opens a directory store only when asked to
    client = MlflowClient(job["logging"]["mlflow"]["tracking_uri"])
    run_id = json.load(open(run_dir / "mlflow.json"))["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["distill.temperature"] == "2.0"
    assert [m.step for m in client.get_metric_history(run_id, "train/kd_loss")] == steps
    assert run.data.metrics["eval/accuracy"] == pytest.approx(summary["student"]["accuracy"])
    assert {a.path for a in client.list_artifacts(run_id, "student")} == {"student/student.json", "student/student.safetensors"}
    assert {a.path for a in client.list_artifacts(run_id)} >= {"report.png", "summary.json"}
    assert os.path.getsize(run_dir / "report.png") > 20_000


def test_kd_ddp_two_workers_then_eval(ray_cluster, online_kd_run):
    proc = online_kd_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student accuracy" in proc.stdout and "run directory:" in proc.stdout
    assert re.search(r"^epoch 1\.\d\d step \d+/\d+  loss", proc.stdout, re.M)  # a progress line per report
    summary = read_summary(online_kd_run["run_dir"])
    assert summary["teacher"]["accuracy"] > 0.9
    # Telemetry: both sides measured, and a verdict.
    t = summary["telemetry"]
    assert t["student_step_seconds"] > 0 and 0 <= t["data_wait_fraction"] <= 1
    assert t["teacher_pool"]["actors_max"] >= 1 and t["teacher_pool"]["rows_per_second"] > 0
    assert t["bottleneck"] in ("student", "teacher pool", "input pipeline") and re.search(r"^bottleneck\s+\w", proc.stdout, re.M)
    # Profiling: a trace per worker, readable as JSON with events in it.
    profile = online_kd_run["run_dir"] / "profile"
    assert sorted(os.listdir(profile)) == ["rank0.top_ops.txt", "rank0.trace.json", "rank1.top_ops.txt", "rank1.trace.json"]
    assert json.loads((profile / "rank0.trace.json").read_text())["traceEvents"]
    assert_loadable(summary, 0.7)
    assert_watchable(online_kd_run["run_dir"], online_kd_run["job"], summary)

    proc = run_here(["eval", online_kd_run["path"]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    # the eval command scores every eval sample; the run's split drops at most world_size - 1
    assert abs(metrics["accuracy"] - summary["student"]["accuracy"]) < 0.02


def test_kd_fsdp_two_workers_with_accumulation(ray_cluster, teacher_weights, tmp_path):
    from kd_ray.checks import validate
    from kd_ray.job import run

    job = kd_job(tmp_path, "kd_fsdp", teacher_weights, strategy="fsdp", micro_batch_size=8)
    spec = validate(job, job_dir=str(tmp_path))
    lines: list[str] = []
    summary = run(spec, echo=lines.append)
    assert summary["accumulation"] == 4 and summary["world_size"] == 2
    assert any(line.startswith("eval") for line in lines)
    assert_loadable(summary, 0.7)


def _same(batch):
    return batch


class _Same:
    def __call__(self, batch):
        return batch


def _physical_plan(ds) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ds.explain()  # plans, executes nothing
    return out.getvalue().split("Physical Plan (Optimized)", 1)[1]


def test_reading_is_not_fused_into_a_cpu_teacher_pool(ray_cluster, teacher_weights, tmp_path):
    """The read tasks of a stream stay tasks of their own, spread over the cluster, when a CPU
    teacher pool follows them (the eval split's scoring): fused into the pool's actors, they ran
    serially with the teacher, and nothing reached the trainers until a whole task had finished.
    Ray fuses such stages unless told not to (the unguarded control below fuses), and a read
    stage as wide as the pool's max_size is fused too (kd_ray.data.streams.read_tasks)."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from kd_ray.checks import validate
    from kd_ray.data.chunks import Sources
    from kd_ray.data.streams import build_eval, read_tasks
    from kd_ray.tasks.build import task_for
    from kd_ray.teacher import TeacherPool

    job = kd_job(tmp_path, "fusion", teacher_weights)
    job["teacher"]["pool"] = {"min_actors": 1, "max_actors": 2, "batch_size": 50}
    spec = validate(job, job_dir=str(tmp_path))
    task = task_for(spec)
    data = Sources(spec, task)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scored = TeacherPool(spec, task).after(build_eval(spec, data))
    assert not [w for w in caught if issubclass(w.category, RayDeprecationWarning)]  # no API Ray is removing
    plan = _physical_plan(scored)
    assert "TaskPoolMapOperator[MapBatches(read_chunks)]" in plan and "MapBatches(read_chunks)->" not in plan, plan
    assert len(scored.take_all()) == data.eval_rows

    def stream(chunks: int, max_actors: int, compute) -> "ray.data.Dataset":
        return ray.data.range(chunks, override_num_blocks=chunks).map_batches(_same, batch_size=1, compute=compute).map_batches(
            _Same, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors), num_cpus=1)

    for chunks, max_actors in ((3, 3), (4, 1), (2, 5)):
        plan = _physical_plan(stream(chunks, max_actors, read_tasks(chunks, max_actors)))
        assert "TaskPoolMapOperator[MapBatches(_same)]" in plan and "MapBatches(_same)->" not in plan, (chunks, max_actors, plan)
    assert "MapBatches(_same)->" in _physical_plan(stream(3, 3, None))  # the check can fail: Ray fuses what nothing keeps apart


def test_teacher_pool_equals_direct_forward(ray_cluster, teacher_weights, tmp_path):
    """The pool's logits, matched by sample id, equal a plain forward of the teacher."""
    from kd_ray.checks import validate
    from kd_ray.core.columns import ID, TEACHER, X
    from kd_ray.data.chunks import Sources
    from kd_ray.data.streams import build_train
    from kd_ray.run.control import RunControl
    from kd_ray.tasks.build import task_for
    from kd_ray.teacher import TeacherPool

    job = kd_job(tmp_path, "pool", teacher_weights)
    job["data"]["shuffle"] = "none"
    job["teacher"]["pool"] = {"min_actors": 1, "max_actors": 2, "batch_size": 50}
    spec = validate(job, job_dir=str(tmp_path))
    task = task_for(spec)
    data = Sources(spec, task)
    rows = build_train(spec, data, end=data.train_rows, block_rows=16, control=RunControl.remote(),
                       pool=TeacherPool(spec, task)).take_all()
    ids = np.array([r[ID] for r in rows])
    assert len(set(ids.tolist())) == len(ids)  # every sample once, with a stable id

    teacher = build_model(TEACHER_SPEC["model"], TEACHER_SPEC["kwargs"])
    load_into(teacher, teacher_weights)
    teacher.eval()
    x = torch.from_numpy(np.stack([r[X] for r in rows]))
    with torch.inference_mode():
        direct = teacher(x).numpy()
    pooled = np.stack([r[TEACHER] for r in rows])
    np.testing.assert_allclose(pooled, direct, rtol=1e-4, atol=1e-4)


def test_supervised_job_on_users_files(ray_cluster, tmp_path):
    """A job with no teacher, through the CLI, on a user's own files: parquet to train on (two
    files, fixed-length list features) and numpy to evaluate on (data.eval_source). Both give
    every row a stable id; the run trains on every train row, scores every eval row, and
    exports a student anyone can load."""
    from sklearn.datasets import load_digits

    from kd_ray.checks import validate
    from kd_ray.data import sources
    from kd_ray.data.ids import is_eval

    x, y = load_digits(return_X_y=True)
    held = is_eval(np.arange(len(y)), 0.2, 0)
    npz = tmp_path / "digits_eval.npz"
    np.savez(npz, pixels=x[held].astype(np.float32), digit=y[held])  # the same names: data.features, data.labels
    job = digits_job(tmp_path, "files", data={
        "source": write_digits_parquet(tmp_path / "digits", ~held), "features": "pixels", "labels": "digit",
        "eval_source": str(npz),
        "shape": [64], "preprocess": {"scale": 0.0625}})
    job["train"].update(num_workers=1, epochs=2, micro_batch_size=32)
    spec = validate(job, job_dir=str(tmp_path))
    for source, rows in ((spec.data.source, (~held).sum()), (spec.data.eval_source, held.sum())):
        ids_a, ids_b = sources.read_ids(source, spec.data), sources.read_ids(source, spec.data)
        assert len(ids_a) == rows and len(set(ids_a.tolist())) == rows, source
        np.testing.assert_array_equal(ids_a, ids_b)

    proc = run_here(["run", write_job(tmp_path / "files.yaml", job)])
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert f"data: {(~held).sum()} train / {held.sum()} eval samples" in proc.stdout, proc.stdout[-3000:]
    summary = read_summary(tmp_path / "runs" / "files")
    assert summary["teacher"] is None and re.search(r"^teacher accuracy\s+\(no teacher\)", proc.stdout, re.M)
    assert summary["steps"] == 2 * (~held).sum() // 64  # 2 passes, cut into full global batches
    assert summary["samples"] == summary["steps"] * 64
    for key in ("status", "steps", "samples", "epochs", "train_seconds", "samples_per_second", "student", "teacher", "student_weights"):
        assert key in summary
    assert_loadable(summary, 0.7)
    info = json.load(open(tmp_path / "runs" / "files" / "student.json"))
    assert info["metrics"]["eval_samples"] == held.sum()  # one worker: the split drops no eval row


def test_failure_in_worker_is_one_line_and_nonzero(ray_cluster, tmp_path):
    """A mistake only the data reveals (labels 0..9 in a user's parquet files, which the spec does
    not read, for a 5-class student): found where a row group is read, before the student sees
    it, and shown as each attempt fails; then exit 2, the reason in one line naming data.labels,
    the file and the row, a failed summary."""
    source = write_digits_parquet(tmp_path / "digits")
    job = digits_job(tmp_path, "broken", data={"source": source, "features": "pixels", "labels": "digit", "shape": [64]})
    job["student"]["kwargs"]["num_classes"] = 5
    job["train"].update(num_workers=1, epochs=1)
    job["run"]["max_failures"] = 1  # two attempts
    proc = run_here(["run", write_job(tmp_path / "broken.yaml", job)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    said = r"UserError: data\.labels: row \d+ of \S+\.parquet has label [5-9]; labels must be class ids 0\.\.4"
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("worker 0 failed: ")]
    assert len(warnings) == 2 and all(re.search(said, w) and not re.search(r"(?<!kd_)ray\.", w) for w in warnings), \
        proc.stdout[-3000:]
    # the workers' own logs stay in Ray's logs (--verbose relays them); the CLI's verdict is one line
    verdicts = [line for line in proc.stderr.splitlines() if line.startswith("kd-ray: ")]
    assert len(verdicts) == 1 and re.match(r"kd-ray: error: data\.labels: row \d+ of \S+ has label [5-9]", verdicts[0]), proc.stderr[-2000:]
    assert read_summary(tmp_path / "runs" / "broken")["status"] == "failed"


def readme_submit_command(job: str) -> list[str]:
    """The `ray job submit ... -- kd-ray run JOB ...` line for a job, as docs/cluster.md prints it
    (its section "On a laptop cluster, under `ray job submit`")."""
    with open(os.path.join(ROOT, "docs", "cluster.md")) as f:
        line = next(ln for ln in f if ln.startswith("ray job submit --working-dir . -- kd-ray run " + job))
    return line.split(" -- ", 1)[1].split()


def test_ray_job_submit_quickstart(ray_cluster, teacher_weights, tmp_path):
    """The quickstart under `ray job submit --working-dir .`: unchanged, its relative run
    directory would lie in Ray's copy of the working directory, and it is refused in one line;
    as docs/cluster.md prints it (a storage path outside the copy, with the session's teacher in
    place of the page's first step), it runs and its results are outside the cluster's session."""
    storage = tmp_path / "kd-ray-runs"
    submit = ["ray", "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", ".",
              "--runtime-env-json", json.dumps({"excludes": [".git", "runs", "tests"]}), "--"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    # The refused submission goes alongside the one that runs: neither depends on the other.
    with open(tmp_path / "refused.log", "w") as log:
        refused = subprocess.Popen([*submit, "kd-ray", "run", "jobs/quickstart.yaml", "teacher=null"], stdout=log,
                                   stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        entry = [arg.replace("$HOME/kd-ray-runs", str(storage)) for arg in readme_submit_command("jobs/quickstart.yaml")]
        entry = [f"teacher.weights={teacher_weights}" if arg.startswith("teacher.weights=") else arg for arg in entry]
        entry += [f"teacher.kwargs.width={TEACHER_SPEC['kwargs']['width']}", "train.epochs=1"]
        proc = subprocess.run([*submit, *entry], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
        refused.wait(timeout=600)
    finally:
        if refused.poll() is None:
            refused.kill()
    out = (tmp_path / "refused.log").read_text()
    assert refused.returncode != 0 and re.search(r"kd-ray: error: run.storage_path: \S+/runtime_resources/working_dir_files/"
                                                 r"\S+ is inside the copy of --working-dir", out), out[-3000:]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-4000:]
    summary = read_summary(storage / "quickstart")
    assert summary["status"] == "finished"
    # The entrypoint's output (after the job manager's "Running entrypoint" line, before `ray job
    # submit`'s closing lines) is kd_ray's, every line of it: none of Ray's deprecation warnings, C++
    # log lines or raylet warnings (they stay in Ray's logs).
    job_lines = re.sub(r"\x1b\[[0-9;]*m", "", out[out.index("Running entrypoint for job"):]).splitlines()[1:]
    job_lines = job_lines[:next(i for i, line in enumerate(job_lines) if re.search(r"Job '\w+' succeeded", line))]
    while job_lines and re.fullmatch(r"(.* -- )?-*", job_lines[-1]):  # `ray job submit`'s rule above its verdict
        job_lines.pop()
    assert job_lines[-1].startswith("run directory: "), job_lines[-5:]
    table: list[str] = []
    print_summary(summary, table.append)
    others = [line for line in job_lines if line not in table and not KD_RAY_LINE.match(line)]
    assert not others, "not kd_ray's:\n" + "\n".join(others)
    assert re.search(r"^epoch \d+\.\d\d step (\d+)/\1 .*  teacher: (done, 1 actor, [\d,]+ rows/s while working|1 actor [\d,]+ rows/s "
                     r"busy \d+%)  \d+:\d\d elapsed, ~0:00 left$", out, re.M), out[-3000:]


@pytest.mark.parametrize("fmt", ["builtin", "parquet"])
def test_stream_holds_every_epoch_once_from_the_cursor(ray_cluster, tmp_path, fmt):
    """One stream, epoch after epoch: each epoch holds every training id exactly once, in an order
    that is a function of (seed, epoch), the same on a rebuild and different from epoch to epoch;
    a cursor set on the run's control makes the stream start exactly there; blocks are one micro-batch."""
    from kd_ray.checks import validate
    from kd_ray.core.columns import ID, POS
    from kd_ray.data.chunks import Sources, read_chunks
    from kd_ray.data.local import local_stream, rank_blocks
    from kd_ray.data.streams import build_train
    from kd_ray.run.control import RunControl
    from kd_ray.tasks.build import task_for

    job = digits_job(tmp_path, "stream")
    job["data"]["augment"] = {"noise_std": 0.1, "shift": 1, "hflip": True}  # views drawn per chunk
    if fmt == "parquet":
        job["data"].update(source=write_digits_parquet(tmp_path / "digits"), features="pixels", labels="digit", shuffle_window=1)
    spec = validate(job, job_dir=str(tmp_path))
    data = Sources(spec, task_for(spec))
    n = data.train_rows

    def read(cursor=0):
        control = RunControl.remote()
        ray.get(control.set_cursor.remote(cursor))
        ds = build_train(spec, data, end=3 * n, block_rows=16, control=control)
        ds.context.execution_options.preserve_order = True  # as the trainer's DataConfig sets it
        blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        assert all(len(b[ID]) == 16 for b in blocks[:-1])
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}

    first = read()
    pos, ids = first[POS], first[ID]
    np.testing.assert_array_equal(pos, np.arange(3 * n))
    epochs = [ids[e * n:(e + 1) * n] for e in range(3)]
    assert all(len(set(e.tolist())) == n and set(e.tolist()) == set(epochs[0].tolist()) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    cursor = n + 37  # mid-epoch, as after a checkpoint
    again = read(cursor)
    np.testing.assert_array_equal(again[POS], np.arange(cursor, 3 * n))
    np.testing.assert_array_equal(again[ID], ids[cursor:])
    # Data in memory and no teacher pool (on CPU): each train worker reads its own micro-batches,
    # the same rows (augmented views included) that the Ray Data split would deal it.
    local = local_stream(spec, data, end=3 * n)
    assert (local is not None) == (fmt == "builtin")  # files and 2 workers: Ray Data reads each row group once for both
    if fmt == "parquet":  # one worker reads every row anyway: it reads the row groups itself
        job["train"]["num_workers"] = 1
        local = local_stream(validate(job, job_dir=str(tmp_path)), data, end=3 * n)
    if local is not None:
        from kd_ray.batch_plan import block_positions

        world = 2
        for per_block in (1, 3):  # dealt as the split deals blocks of that many micro-batches
            seen = []
            for rank in range(world):
                blocks = list(rank_blocks(local, cursor, rank, world, 16, per_block))
                if len(blocks[-1][POS]) % 16:  # the stream's end, part of a micro-batch: no run reaches it
                    blocks.pop()
                assert all(len(b[POS]) % 16 == 0 for b in blocks)
                got = [{k: v[i:i + 16] for k, v in b.items()} for b in blocks for i in range(0, len(b[POS]), 16)]
                for j, b in enumerate(got):
                    at = block_positions(0, rank, world, 16, per_block, j, 1)
                    np.testing.assert_array_equal(b[POS], cursor + at)
                    assert sorted(b) == sorted(again)
                    for k, v in b.items():
                        assert v.dtype == again[k].dtype, k
                        np.testing.assert_array_equal(v, again[k][at])
                    seen.extend(at.tolist())
            whole = (3 * n - cursor) // 16 * 16  # every row of a whole micro-batch, on one rank only
            assert sorted(seen) == list(range(whole))
        # The eval split, read by the workers too: each rank's batches, together, are the Ray Data
        # eval stream's rows, each once, in source order.
        from kd_ray.data.local import rank_eval_batches
        from kd_ray.data.streams import build_eval

        streamed = [b for b in build_eval(spec, data).iter_batches(batch_size=None, batch_format="numpy")]
        streamed = {k: np.concatenate([b[k] for b in streamed]) for k in streamed[0]}
        for world in (1, 3):
            got = [b for rank in range(world) for b in rank_eval_batches(local, rank, world, 100)]
            assert sorted(got[0]) == sorted(streamed)
            for k, v in streamed.items():
                np.testing.assert_array_equal(np.concatenate([b[k] for b in got]), v)
    # The first chunk, wholly before that cursor, yields no block at all: Ray cannot type an
    # empty array of samples (it would fall back to pickled objects, with a warning).
    control = RunControl.remote()
    ray.get(control.set_cursor.remote(cursor))
    assert list(read_chunks({"id": np.array([0])}, ray.put(data.reader), ray.put(data.train), spec.run.seed, spec.data.shuffle,
                            data.transform(True), control, end=3 * n)) == []
