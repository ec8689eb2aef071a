"""Surviving the cloud, with real process deaths on the session's real Ray cluster.

Workers die by `os._exit` at a given step (the tests' DieAt callback, tests/faults.py, named in
the job file as a user's own callbacks are), the driver by SIGKILL or SIGTERM from the test,
worker nodes by SIGKILL of their raylet's process group, and a teacher actor by SIGKILL of its
process. Each run records the sample ids of every optimizer step (the Trace callback) so the
tests can check that every epoch's samples were trained exactly once by the steps that survived.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections import defaultdict

import faults
import numpy as np
import pytest
import ray
from conftest import TEACHER_SPEC, cli, digits_job, run_here, write_job

pytestmark = pytest.mark.slow

G = 64  # global batch of the jobs below


def job_file(tmp_path, name, callbacks: list[dict], **train) -> str:
    job = digits_job(tmp_path, name)
    job["run"]["deterministic"] = True
    job["checkpoint"] = {"every_steps": 10, "keep": 3, "poll_every_steps": 2}
    job["train"].update(train)
    job["callbacks"] = callbacks
    return write_job(tmp_path / f"{name}.yaml", job)


def hooks(tmp_path, die_at: tuple[int, ...] = ()) -> list[dict]:
    """The job's callbacks: trace every step to tmp_path/trace, and kill the last rank's worker
    after each step of `die_at` (once each, remembered in tmp_path/marks)."""
    trace, marks = tmp_path / "trace", tmp_path / "marks"
    trace.mkdir(exist_ok=True)
    marks.mkdir(exist_ok=True)
    faults.install(tmp_path)
    out = [{"callable": "faults:Trace", "kwargs": {"directory": str(trace)}}]
    if die_at:
        out.append({"callable": "faults:DieAt", "kwargs": {"steps": list(die_at), "marks": str(marks)}})
    return out


def run_to_end(args) -> tuple[int, str]:
    """A run no test signals: the CLI in this process (the workers still die for real)."""
    proc = run_here(args)
    return proc.returncode, proc.stdout + proc.stderr


def surviving_steps(trace_dir) -> dict[int, list[tuple[int, int]]]:
    """The (position, id) pairs of each optimizer step as the run's final weights saw them: a
    step taken again after a restart counts only in its last attempt (all ranks of that attempt)."""
    entries = defaultdict(list)  # step -> [(time, attempt, pairs, world)]
    for name in os.listdir(trace_dir):
        for line in open(os.path.join(trace_dir, name)):
            e = json.loads(line)
            entries[e["step"]].append((e["time"], e["attempt"], list(zip(e["positions"], e["ids"])), e["world"]))
    out = {}
    for step, es in entries.items():
        last = max(es)[1]
        chosen = [e for e in es if e[1] == last]
        assert len(chosen) == chosen[0][3], f"step {step}: {len(chosen)} ranks recorded, world size {chosen[0][3]}"
        out[step] = sorted(p for e in chosen for p in e[2])
    return out


def assert_exactly_once(steps: dict[int, list[tuple[int, int]]], total_steps: int, train_ids: set[int]) -> None:
    assert sorted(steps) == list(range(1, total_steps + 1))
    for s, pairs in steps.items():  # step s trained positions [(s - 1) G, s G): the global batch never changed
        assert [p for p, _ in pairs] == list(range((s - 1) * G, s * G)), f"step {s}"
    stream = [i for s in sorted(steps) for _, i in steps[s]]
    n = len(train_ids)
    for e in range(len(stream) // n):  # every complete epoch: each sample once
        epoch = stream[e * n:(e + 1) * n]
        assert sorted(epoch) == sorted(train_ids), f"epoch {e} lost or repeated samples"
    tail = stream[(len(stream) // n) * n:]
    assert len(set(tail)) == len(tail) and set(tail) <= train_ids  # the partial last epoch: no repeats


def train_ids(tmp_path) -> set[int]:
    from kd_ray.checks import validate
    from kd_ray.data.chunks import Sources
    from kd_ray.data.sources import UNIT_ROWS
    from kd_ray.tasks.build import task_for

    spec = validate(digits_job(tmp_path, "ids"), job_dir=str(tmp_path))
    units = Sources(spec, task_for(spec)).train.units
    return {int(r) + u * UNIT_ROWS for u, rows in enumerate(units) for r in rows}


def assert_logged_once(run_dir, total_steps: int, epochs: int, starts: list[int], log_every) -> None:
    """metrics.jsonl and the TensorBoard events hold each logged step of the run once, in order,
    none lost: the steps that survived, each logged by the attempt whose weights the run kept.
    `log_every(step)`: the job's train.log_every when that step was trained."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kd_ray import batch_plan
    from kd_ray.run.metrics import read_metrics

    plan = batch_plan.plan(len(train_ids(run_dir.parent.parent)), G, 16, 2, epochs, None)
    expected = [s for s in range(1, total_steps + 1)
                if s % log_every(s) == 0 or plan.epochs_done(s) > plan.epochs_done(s - 1) or s == total_steps]
    records = read_metrics(str(run_dir))
    assert [r["step"] for r in records if r["kind"] == "start"] == starts
    assert [r["step"] for r in records if r["kind"] == "train"] == expected
    evals = [r["step"] for r in records if r["kind"] == "eval"]
    assert evals == sorted(set(evals)) and len(evals) == epochs, evals
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == expected


def summary_of(tmp_path, name) -> dict:
    with open(tmp_path / "runs" / name / "summary.json") as f:
        return json.load(f)


def weights_of(tmp_path, name):
    from safetensors.torch import load_file

    return load_file(str(tmp_path / "runs" / name / "student.safetensors"))


def test_worker_dies_twice_same_steps_samples_and_weights(ray_cluster, tmp_path, background):
    """Two real worker deaths (between checkpoints): the run finishes with the planned steps,
    every epoch's samples trained exactly once, and weights equal to an uninterrupted run."""
    path = job_file(tmp_path, "faulty", hooks(tmp_path, die_at=(15, 33)))
    # The uninterrupted run of the same job (its own run directory, no callbacks) goes alongside:
    # both are deterministic, and much of each is waiting for workers to start.
    clean = background(["run", path, "run.name=clean", "callbacks=[]"], tmp_path / "clean.log")
    code, out = run_to_end(["run", path])
    assert code == 0, out[-4000:]
    summary = summary_of(tmp_path, "faulty")
    assert summary["restarts"] == 2 and summary["steps"] == 44, (summary, out[-6000:])
    assert sorted(os.listdir(tmp_path / "marks")) == ["died_at_15", "died_at_33"]
    assert out.count("from step 10 (data position 640)") == 1 and out.count("from step 30 (data position 1920)") == 1, out
    assert_exactly_once(surviving_steps(tmp_path / "trace"), 44, train_ids(tmp_path))
    assert_logged_once(tmp_path / "runs" / "faulty", 44, 2, [0, 10, 30], lambda s: 10)

    assert clean.wait(timeout=600) == 0, (tmp_path / "clean.log").read_text()[-4000:]
    a, b = weights_of(tmp_path, "faulty"), weights_of(tmp_path, "clean")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


def wait_for_checkpoints(run_dir, count: int, proc, after: int = 0, timeout=300) -> list[int]:
    """The steps of the run's checkpoints once `count` of them are past step `after`."""
    from kd_ray.train import checkpoint

    end = time.time() + timeout
    while time.time() < end:
        steps = sorted(int((checkpoint.read_resume(p) or {}).get("step", -1)) for p in checkpoint.candidates(str(run_dir)))
        steps = [s for s in steps if s > after]
        if len(steps) >= count:
            return steps
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        time.sleep(0.5)
    raise AssertionError(f"no {count} checkpoints past step {after} in {run_dir} after {timeout}s")


def wait_until_no_actor(class_name: str, timeout=120) -> None:
    from ray.util.state import list_actors

    end = time.time() + timeout
    while time.time() < end:
        if not [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000) if class_name in (a.class_name or "")]:
            return
        time.sleep(0.5)
    raise AssertionError(f"{class_name} actors still alive after {timeout}s")


def test_stopped_then_killed_then_damaged_run_finishes_its_plan(ray_cluster, tmp_path):
    """The life of a run on preemptible machines, one command throughout:
    1. SIGTERM after a checkpoint: the workers checkpoint, the CLI exits 130, the summary says
       stopped at that step.
    2. The same command resumes from exactly that step.
    3. SIGKILL of the driver after two more checkpoints, and the newest one damaged: a job file
       changed incompatibly is refused in one line naming the field; the same command (with a
       compatible change) warns, naming both checkpoints, resumes from the older one (not step
       0) and finishes the plan, every epoch's samples trained exactly once."""
    from kd_ray.train import checkpoint

    path = job_file(tmp_path, "preemptible", hooks(tmp_path), epochs=4)
    run_dir = tmp_path / "runs" / "preemptible"
    proc = cli(["run", path], ray_cluster)
    wait_for_checkpoints(run_dir, 1, proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-4000:]
    stopped = summary_of(tmp_path, "preemptible")
    assert stopped["status"] == "stopped" and stopped["steps"] > 0, stopped
    assert "stopping: the workers checkpoint" in out and f"stopped at step {stopped['steps']} after a checkpoint" in out

    proc = cli(["run", path], ray_cluster)
    wait_for_checkpoints(run_dir, 2, proc, after=stopped["steps"])
    os.kill(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    assert f"resuming run preemptible from step {stopped['steps']}" in out, out[-3000:]
    # The workers outlive their driver by a moment (Ray reaps them when it sees the owner gone)
    # and may write one more checkpoint: the newest is known once they are gone.
    wait_until_no_actor("RayTrainWorker")
    newest, older = checkpoint.candidates(str(run_dir))[:2]
    newest_step, older_step = (checkpoint.read_resume(p)["step"] for p in (newest, older))
    with open(os.path.join(newest, checkpoint.STUDENT_WEIGHTS), "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 64)

    code, out = run_to_end(["run", path, "train.global_batch_size=32", "train.micro_batch_size=8"])
    assert code == 2, out[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("kd-ray: error")]
    assert len(line) == 1 and "train.global_batch_size: 64 -> 32" in line[0] and "--fresh" in line[0], out[-3000:]

    code, out = run_to_end(["run", path, "train.log_every=5"])  # a compatible change
    assert code == 0, out[-4000:]
    assert f"checkpoint {os.path.basename(newest)} cannot be used" in out and os.path.basename(older) in out, out[-4000:]
    assert f"resuming run preemptible from step {older_step}" in out, out[-4000:]
    summary = summary_of(tmp_path, "preemptible")
    assert summary["status"] == "finished" and summary["steps"] == 88 and summary["resumed_from_step"] == older_step
    assert newest_step > older_step > stopped["steps"]
    assert_exactly_once(surviving_steps(tmp_path / "trace"), 88, train_ids(tmp_path))
    assert_logged_once(run_dir, 88, 4, [0, stopped["steps"], older_step], lambda s: 10 if s <= older_step else 5)


# A user's own model module next to the job file: a built-in model whose every forward first
# sleeps for the number of seconds written in a file. The tests slow the teacher (so the pool,
# not the student, sets the pace and is still streaming when it is killed) or the student (so
# the run is still going while nodes join and leave) and set 0 to let the run finish.
THROTTLE = """
import time
from kd_ray.models import BUILTINS

def throttled(base, delay_file, **kwargs):
    model = BUILTINS[base](**kwargs)

    def wait(module, args):
        with open(delay_file) as f:
            time.sleep(float(f.read()))

    model.register_forward_pre_hook(wait)
    return model
"""


def set_delay(delay_file, seconds: float) -> None:
    """A new delay, whole: written beside the file and renamed over it, so that a forward never
    reads a half-written (empty) one."""
    tmp = delay_file.with_name(delay_file.name + ".new")
    tmp.write_text(str(seconds))
    os.replace(tmp, delay_file)


def throttled(tmp_path, spec: dict, delay: float) -> tuple[dict, object]:
    """A copy of a model section made slow by `delay` seconds per forward, and its delay file."""
    (tmp_path / "throttle.py").write_text(THROTTLE)
    delay_file = tmp_path / f"delay_{spec['model']}"
    delay_file.write_text(str(delay))
    return {**spec, "model": "throttle:throttled", "kwargs": {**spec["kwargs"], "base": spec["model"], "delay_file": str(delay_file)}}, delay_file


def test_teacher_actor_killed_mid_epoch_delivers_every_sample(ray_cluster, teacher_weights, tmp_path):
    from ray.util.state import list_actors

    job = digits_job(tmp_path, "teacher_killed")
    teacher, _ = throttled(tmp_path, TEACHER_SPEC, 0.25)
    job["teacher"] = {**teacher, "weights": teacher_weights, "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 32}}
    job["run"]["deterministic"] = True
    job["checkpoint"] = {"every_steps": 10, "keep": 3, "poll_every_steps": 2}
    job["train"].update(epochs=2, num_workers=1, prefetch_batches=1)
    job["callbacks"] = hooks(tmp_path)
    path = write_job(tmp_path / "teacher_killed.yaml", job)
    trace = tmp_path / "trace" / "rank0.jsonl"
    killed, killed_at, done = [], [], threading.Event()

    def kill_the_pool_once_training() -> None:
        while not done.is_set() and len(trace.read_text().splitlines() if trace.exists() else []) < 5:
            time.sleep(0.2)  # into training: the driver's teacher-scoring pool is long gone
        for actor in [] if done.is_set() else list_actors(filters=[("state", "=", "ALIVE")], detail=True):
            if "MapWorker" in (actor.class_name or ""):  # a Ray Data pool actor (kd_ray.teacher)
                os.kill(actor.pid, signal.SIGKILL)
                killed.append(actor.class_name)
        killed_at.append(len(trace.read_text().splitlines()) if trace.exists() else 0)

    # The run in this process (its driver is not what dies), the kill from a thread beside it.
    killer = threading.Thread(target=kill_the_pool_once_training, daemon=True)
    killer.start()
    proc = run_here(["run", path])
    done.set()
    killer.join()
    out = proc.stdout + proc.stderr
    assert killed, "no teacher actor was killed while the run trained: " + out[-4000:]
    killed_at = killed_at[0]
    assert proc.returncode == 0, out[-4000:]
    summary = summary_of(tmp_path, "teacher_killed")
    assert summary["steps"] == 44, summary
    assert 44 - killed_at > 10, f"the stream had nearly finished when the teacher was killed (step {killed_at})"
    assert_exactly_once(surviving_steps(tmp_path / "trace"), 44, train_ids(tmp_path))
    print(f"teacher actor {killed} killed after step {killed_at} of 44: {summary['restarts']} worker-group restart(s)")


# ---------------------------------------------------------------------------------------------
# Several Ray nodes on this machine


class Node:
    """A worker node of the session cluster: `ray start --block` in its own process group, so
    SIGKILL to the group is the node dying (raylet, workers and all)."""

    def __init__(self, cluster, resources: dict):
        self.log = tempfile.TemporaryFile()
        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        end = time.time() + 180  # a loaded 2-core machine can take a while to start a raylet
        self.node_id = None
        while self.node_id is None and time.time() < end:
            # `ray start` gives up by itself when the GCS is slow to answer ("timed out during
            # startup", seen once late in a long session): start it again, the test is not about that.
            if getattr(self, "proc", None) is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(
                    ["ray", "start", "--block", "--address", cluster.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                     "--resources", json.dumps(resources), "--disable-usage-stats"],
                    stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            new = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before]
            self.node_id = new[0] if new else None
            time.sleep(0.5)
        if self.node_id is None:
            self.kill()
            self.log.seek(0)
            raise AssertionError("the node did not join: " + self.log.read().decode(errors="replace")[-3000:])

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # a `ray start` that had already given up
            pass
        self.proc.wait()


def stop_nodes(*nodes: Node | None) -> None:
    """Kill the nodes still up, and wait until Ray has marked them dead (missed heartbeats):
    until then it may still place a later test's actors on them."""
    for node in nodes:
        if node and node.proc.poll() is None:
            node.kill()
    gone = {n.node_id for n in nodes if n}
    deadline = time.monotonic() + 120
    while any(n["NodeID"] in gone and n["Alive"] for n in ray.nodes()) and time.monotonic() < deadline:
        time.sleep(1)


def wait_for_line(proc, lines: list[str], needle: str, timeout=300) -> None:
    start = time.time()
    end = start + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            assert proc.poll() is None, "".join(lines)[-4000:]
            continue
        lines.append(line)
        if needle in line:
            print(f"  +{time.time() - start:5.1f}s  {needle}")
            return
    raise AssertionError(f"no '{needle}' in:\n" + "".join(lines)[-4000:])


def test_elastic_group_grows_then_shrinks_on_preemption(ray_cluster, tmp_path):
    """One student node, then two (the group grows), then the second is drained as preempted
    (a checkpoint is taken before it goes) and killed (the group shrinks): the run finishes,
    the global batch is the same throughout, and no sample is lost or repeated."""
    job = digits_job(tmp_path, "elastic")
    job["student"], delay = throttled(tmp_path, job["student"], 0.3)  # slow until the group has grown
    job["run"]["deterministic"] = True
    job["checkpoint"] = {"every_steps": 10, "keep": 3, "poll_every_steps": 2}
    job["train"].update(epochs=4, num_workers=[1, 2], resources_per_worker={"student_node": 1}, resize_check_seconds=2)
    # Through Ray Data's split, re-dealt at each new world size (the other tests here train on data
    # in memory with no teacher pool, which the workers read themselves).
    job["data"]["stream"] = "ray_data"
    job["callbacks"] = hooks(tmp_path)
    path = write_job(tmp_path / "elastic.yaml", job)
    first = Node(ray_cluster, {"student_node": 1})
    second = None
    # After the node's death Ray Train first restarts the group at the old size: its view of the
    # nodes is refreshed every 20 s. That start waits for a placement that never comes, for this
    # timeout (60 s by default), before the group starts at the new size; here 20 s is plenty.
    proc = cli(["run", path], ray_cluster, {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"})
    lines: list[str] = []
    try:
        wait_for_line(proc, lines, "start: world size 1, accumulation 4")
        second = Node(ray_cluster, {"student_node": 1})
        wait_for_line(proc, lines, "start: world size 2, accumulation 2")
        set_delay(delay, 0.1)
        wait_for_line(proc, lines, "epoch ")
        # Little progress between the notice and the node's death (4 s a step): the next every-10-steps
        # checkpoint must not land in between, or the run would rightly resume from that one instead.
        set_delay(delay, 2.0)
        subprocess.run(["ray", "drain-node", "--address", ray_cluster.address, "--node-id", second.node_id,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                        "--deadline-remaining-seconds", "60"], check=True, capture_output=True, input="y\n", text=True)
        wait_for_line(proc, lines, "will be preempted: checkpoint taken")  # must resume from this checkpoint
        second.kill()
        wait_for_line(proc, lines, "start: world size 1, accumulation 4")
        set_delay(delay, 0)
        rest, _ = proc.communicate(timeout=600)
        out = "".join(lines) + rest
        assert proc.returncode == 0, out[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_nodes(first, second)
    summary = summary_of(tmp_path, "elastic")
    assert summary["world_sizes"][:3] == [1, 2, 1] and summary["steps"] == 88, summary
    preempt_step = int(re.search(r"will be preempted: checkpoint taken at step (\d+)", out).group(1))
    shrunk = re.findall(r"start: world size 1, accumulation 4, .* from step (\d+)", out)
    assert shrunk and int(shrunk[-1]) == preempt_step, out[-4000:]  # resumed from the preemption checkpoint
    assert_exactly_once(surviving_steps(tmp_path / "trace"), 88, train_ids(tmp_path))
    print(f"elastic: world sizes {summary['world_sizes']}, {summary['restarts']} restarts, preemption checkpoint "
          f"at step {preempt_step}, resumed from it; 88/88 steps")
