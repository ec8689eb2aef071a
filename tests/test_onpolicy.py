"""On-policy distillation end to end, on the session's Ray cluster, with the session's small LM
teacher (conftest.lm_teacher): the student generates continuations of held-out and training
prompts from its published weights, the teacher scores every generated token.

- A run (2 train workers, half of each micro-batch generated, one step of staleness) whose train
  worker, rollout actor, teacher actor and driver are each killed once (real SIGKILLs and
  exits, through the job's callbacks) and which is resumed by the same command: every step trains
  exactly its global batch's prompts, and its final weights equal an uninterrupted run's (CPU,
  fp32, deterministic).
- A strictly on-policy run (staleness 0) with the teacher colocated and the sampled-token loss:
  no rollout is stale, and the evaluation scores the student's own samples.
- An elastic run (1 to 2 train workers, one per node of its own) with the teacher pool and the
  sampled-token loss: it grows when a second node joins and shrinks when that node dies, and
  every step still trains exactly its global batch's prompts once; the teacher sends one
  log-probability per token.
"""

from __future__ import annotations

import json
import os
import time

import faults
import pytest
import torch
from conftest import cli, run_here, write_job
from test_fault_tolerance import (
    Node,
    set_delay,
    stop_nodes,
    surviving_steps,
    wait_until_no_actor,
)

pytestmark = pytest.mark.slow

G, STEPS = 8, 14
STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=256)


def op_job(root, name: str, lm_teacher: dict, **sections) -> dict:
    job = {
        "task": "causal_lm",
        "run": {"name": name, "storage_path": str(root / "runs"), "seed": 0, "deterministic": True},
        "data": {"source": lm_teacher["data"], "text": "text", "tokenizer": os.path.join(lm_teacher["teacher"], "tokenizer.json"),
                 "max_seq_len": 64, "packing": "pad", "eval_split": 0.1},
        "teacher": {"model": lm_teacher["teacher"], "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 16}},
        "student": {"model": "llama", "kwargs": STUDENT},
        "distill": {"loss": "reverse_kl", "temperature": 1.0, "alpha": 0.8, "top_k": 32},
        "onpolicy": {"fraction": 0.5, "prompt_tokens": 12, "max_new_tokens": 20, "max_staleness": 1, "eval_prompts": 8,
                     "samples": 2, "pool": {"batch_size": 4}},
        "train": {"max_steps": STEPS, "global_batch_size": G, "micro_batch_size": 2, "num_workers": 2,
                  "optimizer": {"name": "adamw", "lr": 0.004}, "log_every": 2},
        "checkpoint": {"every_steps": 3, "keep": 2, "poll_every_steps": 1},
        "eval": {"every_epochs": 0, "batch_size": 32},
    }
    for section, values in sections.items():
        job[section] = {**job[section], **values}
    return job


def wait_for(log, needle: str, after: int = 0, timeout: float = 300, trace=None, world: int = 0, count: int = 0) -> int:
    """Until the run's console `log` holds `needle` past character `after` (then: where it ends),
    or, given `trace`, until rank 0 has traced `count` steps with the group at `world` workers;
    else an AssertionError with the console's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if trace is None and needle in text[after:]:
            return text.index(needle, after) + len(needle)
        if trace is not None and (trace / "rank0.jsonl").exists():
            whole = (trace / "rank0.jsonl").read_text().split("\n")[:-1]  # the last line may be half written
            if sum(json.loads(line)["world"] == world for line in whole) >= count:
                return after
        time.sleep(0.5)
    raise AssertionError(f"no {needle!r} in {timeout} s:\n" + log.read_text()[-4000:])


def summary_of(root, name: str) -> dict:
    return json.load(open(root / "runs" / name / "summary.json"))


def test_killed_everywhere_on_policy_run_trains_each_prompt_once_and_as_an_uninterrupted_one(ray_cluster, lm_teacher, tmp_path):
    from kd_ray.models.weights import read_state_dict

    faults.install(tmp_path)
    trace, marks = tmp_path / "trace", tmp_path / "marks"
    trace.mkdir()
    marks.mkdir()
    pid_file = tmp_path / "driver.pid"
    job = op_job(tmp_path, "op", lm_teacher)
    job["callbacks"] = [
        {"callable": "faults:Trace", "kwargs": {"directory": str(trace)}},
        {"callable": "faults:DieAt", "kwargs": {"steps": [4], "marks": str(marks)}},  # a train worker exits
        {"callable": "faults:KillAt", "kwargs": {"step": 6, "mark": str(marks / "rollout"), "actor": "RolloutWorker"}},
        {"callable": "faults:KillAt", "kwargs": {"step": 8, "mark": str(marks / "teacher"), "actor": "ScoringTeacher"}},
        {"callable": "faults:KillAt", "kwargs": {"step": 11, "mark": str(marks / "driver"), "pid_file": str(pid_file)}},
    ]
    path = write_job(tmp_path / "op.yaml", job)
    reference = cli(["run", write_job(tmp_path / "ref.yaml", op_job(tmp_path, "ref", lm_teacher))], ray_cluster)
    try:
        proc = cli(["run", path], ray_cluster)
        pid_file.write_text(str(proc.pid))
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode not in (0, None), out[-3000:]  # killed at step 11
        assert sorted(os.listdir(marks)) == ["died_at_4", "driver", "rollout", "teacher"], out[-3000:]
        wait_until_no_actor("RayTrainWorker")
        resumed = run_here(["run", path])
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resuming run op from step 9" in resumed.stdout, resumed.stdout[-3000:]
        assert reference.wait(timeout=900) == 0, reference.stdout.read()[-3000:]
    finally:
        reference.kill()

    summary, ref = summary_of(tmp_path, "op"), summary_of(tmp_path, "ref")
    assert summary["status"] == ref["status"] == "finished" and summary["steps"] == STEPS
    steps = surviving_steps(trace)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for s, pairs in steps.items():  # each step trained exactly its global batch's prompts, once
        assert [p for p, _ in pairs] == list(range((s - 1) * G, s * G)), f"step {s}"
    mine, theirs = read_state_dict(summary["student_weights"]), read_state_dict(ref["student_weights"])
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=1e-6)
    assert summary["student"] == ref["student"] and summary["student"]["reverse_kl"] > 0
    rollouts = summary["telemetry"]["rollouts"]
    assert rollouts["tokens"] > 0 and 0 < rollouts["staleness_mean"] <= 1, rollouts
    samples = (tmp_path / "runs" / "op" / "samples.md").read_text()
    assert samples.count("**student:**") == samples.count("**teacher:**") == 2


def test_strictly_on_policy_with_a_colocated_teacher_and_the_sampled_token_loss(ray_cluster, lm_teacher, tmp_path):
    job = op_job(tmp_path, "strict", lm_teacher, teacher={"placement": "colocated"},
                 distill={"loss": "sampled_token", "alpha": 1.0},
                 onpolicy={"fraction": 1.0, "max_staleness": 0, "samples": 0},
                 train={"max_steps": 6, "num_workers": 1, "micro_batch_size": 4},
                 checkpoint={"every_steps": 100})  # the final checkpoint only
    proc = run_here(["run", write_job(tmp_path / "strict.yaml", job)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = summary_of(tmp_path, "strict")
    assert summary["status"] == "finished" and summary["telemetry"]["rollouts"]["staleness_mean"] == 0
    student = summary["student"]
    assert student["reverse_kl"] > 0 and student["teacher_nll"] > 0, student
    assert "on its own samples: reverse KL" in proc.stdout
    assert not (tmp_path / "runs" / "strict" / "samples.md").exists()
    # Versions a resume from the final checkpoint needs, not one per step: a start from step 0 is
    # no checkpoint and pins none (kd_ray.rollouts.versions.oldest_needed).
    from kd_ray.rollouts.versions import published

    assert published(str(tmp_path / "runs" / "strict")) == [6]


def test_elastic_on_policy_run_keeps_its_global_batch_through_a_grow_and_a_shrink(ray_cluster, lm_teacher, tmp_path):
    steps = 30
    faults.install(tmp_path)
    trace, pace = tmp_path / "trace", tmp_path / "pace"
    trace.mkdir()
    set_delay(pace, 4.0)  # slow while a node starts (up to 2 minutes on a loaded machine), so that steps are left
    job = op_job(tmp_path, "elastic", lm_teacher, distill={"loss": "sampled_token", "alpha": 1.0},
                 onpolicy={"fraction": 1.0, "samples": 0},
                 train={"max_steps": steps, "num_workers": [1, 2], "resources_per_worker": {"student_node": 1},
                        "resize_check_seconds": 2})
    job["callbacks"] = [{"callable": "faults:Trace", "kwargs": {"directory": str(trace)}},
                        {"callable": "faults:Pace", "kwargs": {"path": str(pace)}}]
    path = write_job(tmp_path / "elastic.yaml", job)
    # After the node's death Ray Train restarts the group at the old size first (see the elastic
    # test in test_fault_tolerance): 20 s is enough to give up on it here.
    log = tmp_path / "elastic.log"
    with open(log, "w") as f:
        proc = cli(["run", path], ray_cluster, {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}, stdout=f)
    first = second = None
    try:
        first = Node(ray_cluster, {"student_node": 1})  # while the driver starts: its group waits for the node
        at = wait_for(log, "start: world size 1, accumulation 4")
        second = Node(ray_cluster, {"student_node": 1})
        at = wait_for(log, "start: world size 2, accumulation 2", at)
        set_delay(pace, 0.3)
        # past a checkpoint (every 3 steps) of the group of 2, which the shrunk group resumes from
        wait_for(log, "5 steps at world size 2", at, trace=trace, world=2, count=5)
        set_delay(pace, 4.0)
        second.kill()
        wait_for(log, "start: world size 1, accumulation 4", at)
        set_delay(pace, 0)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_nodes(first, second)
    summary = summary_of(tmp_path, "elastic")
    assert summary["status"] == "finished" and summary["steps"] == steps and summary["world_sizes"][:3] == [1, 2, 1], summary
    trained = surviving_steps(trace)
    assert sorted(trained) == list(range(1, steps + 1))
    for s, pairs in trained.items():  # the global batch never changed: each step its own prompts, once
        assert [p for p, _ in pairs] == list(range((s - 1) * G, s * G)), f"step {s}"
    assert summary["teacher_bytes_per_token"] == 4, summary
    assert 0 <= summary["telemetry"]["rollouts"]["staleness_mean"] <= 1 and summary["student"]["reverse_kl"] > 0, summary
