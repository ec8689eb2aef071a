"""teacher.placement: colocated, the teacher inside each train worker.

- A colocated run trains the weights the pool's run of the same deterministic job trains (CPU, fp32),
  and starts no teacher pool; sharded by FSDP2 with accumulation and augmentation, through a
  worker's death, it resumes exactly and still trains the pool run's weights.
- An FSDP2-sharded colocated teacher on 2 gloo workers sends the unsharded teacher's signal, for a
  classifier and for a language model.
- What cannot work is one line naming teacher.placement.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib

import pytest
import torch
from conftest import (
    TEACHER_SPEC,
    assert_trained_alike,
    digits_job,
    kd_job,
    spawn_gloo,
    write_job,
)
from test_lm import VOCAB, _batches, _tiny_lm

from kd_ray.core.columns import (
    TAIL_LSE,
    TARGET_LOGPROB,
    TEACHER,
    TOPK_INDICES,
    TOPK_VALUES,
    X,
)
from kd_ray.core.errors import UserError
from kd_ray.spec import parse


def colocated_job(job: dict, tmp_path, name: str = "colocated") -> dict:
    job = copy.deepcopy(job)
    job["run"].update(name=name, storage_path=str(tmp_path / "runs"))
    job["teacher"]["placement"] = "colocated"
    job.pop("profile", None)
    job.pop("logging", None)
    return job


def _teacher_pool_actors() -> int:
    from ray.util.state import list_actors

    return sum(any(c in (a.class_name or "") for c in ("TeacherPredictor", "ReadingTeacher")) for a in list_actors(limit=10_000))


def test_colocated_run_equals_pool_run(ray_cluster, online_kd_run, tmp_path):
    """The session's pool run (2 DDP workers, accumulation 2), trained again with the teacher in each
    worker, reading the data themselves. On CPU this teacher's logits do not depend on how rows are
    batched (the pool runs 64 rows at a time, a colocated teacher each 16-row micro-batch): both
    runs do the same arithmetic, and 1e-6 leaves room only for float summation order."""
    from kd_ray.checks import validate
    from kd_ray.job import run

    assert online_kd_run["proc"].returncode == 0, online_kd_run["proc"].stderr[-3000:]
    job = colocated_job(online_kd_run["job"], tmp_path)
    pools = _teacher_pool_actors()
    lines: list[str] = []
    colocated = run(validate(job, job_dir=str(tmp_path)), echo=lines.append)
    assert colocated["status"] == "finished", lines
    assert _teacher_pool_actors() == pools  # no teacher pool was started
    pool = json.load(open(online_kd_run["run_dir"] / "summary.json"))
    assert_trained_alike(colocated, pool)
    assert colocated["teacher"]["loss"] == pytest.approx(pool["teacher"]["loss"], rel=1e-6)
    print(f"\nsamples/s: pool {pool['samples_per_second']}, colocated {colocated['samples_per_second']}")


def test_sharded_colocated_run_resumes_exactly_and_trains_the_pool_runs_weights(ray_cluster, teacher_weights, tmp_path,
                                                                                  background):
    """The student and the colocated teacher sharded by FSDP2 over 2 workers, accumulation 4,
    augmentation (which the teacher sees, as the pool's does), deterministic, and a real worker
    death at step 15: the run finishes its plan from its step-10 checkpoint with every sample of
    each epoch once, and ends with the weights of the same job run uninterrupted with a teacher
    pool. The sharded teacher is not channels_last (FSDP2 shards contiguous parameters only), so
    its logits may differ from the pool's in the last bits: 1e-5."""
    from test_fault_tolerance import (
        assert_exactly_once,
        hooks,
        run_to_end,
        summary_of,
        surviving_steps,
        train_ids,
        weights_of,
    )

    job = kd_job(tmp_path, "colocated_fsdp", teacher_weights, strategy="fsdp", micro_batch_size=8)
    job["run"]["deterministic"] = True
    job["data"]["augment"] = {"noise_std": 0.05}
    job["checkpoint"] = {"every_steps": 10, "keep": 3, "poll_every_steps": 2}
    job["teacher"]["placement"] = "colocated"
    job["callbacks"] = hooks(tmp_path, die_at=(15,))
    path = write_job(tmp_path / "colocated_fsdp.yaml", job)
    pool = background(["run", path, "run.name=pool", "callbacks=[]", "teacher.placement=pool"], tmp_path / "pool.log")
    code, out = run_to_end(["run", path])
    assert code == 0, out[-4000:]
    summary = summary_of(tmp_path, "colocated_fsdp")
    assert summary["restarts"] == 1 and summary["accumulation"] == 4 and "from step 10" in out, (summary, out[-4000:])
    assert_exactly_once(surviving_steps(tmp_path / "trace"), summary["steps"], train_ids(tmp_path))
    assert pool.wait(timeout=900) == 0, (tmp_path / "pool.log").read_text()[-4000:]
    mine, theirs = weights_of(tmp_path, "colocated_fsdp"), weights_of(tmp_path, "pool")
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert summary["teacher"]["accuracy"] == summary_of(tmp_path, "pool")["teacher"]["accuracy"]


# ------------------------------------------------------------------------------ sharded teacher


def _classify_spec(teacher_weights: str, strategy: str):
    job = digits_job(pathlib.Path("unused"), "sharded")
    job["teacher"] = {**TEACHER_SPEC, "weights": teacher_weights, "placement": "colocated"}
    job["train"]["strategy"] = strategy
    return parse(job)


def _lm_task(strategy: str):
    from kd_ray.tasks.causal_lm import CausalLM

    spec = parse({"task": "causal_lm", "run": {"name": "t"}, "data": {"source": "x.jsonl", "tokenizer": "tok.json"},
                  "teacher": {"model": "llama", "placement": "colocated"}, "student": {"model": "llama"},
                  "distill": {"temperature": 2.0, "top_k": 6, "chunk_tokens": 16},
                  "train": {"max_steps": 1, "global_batch_size": 8, "micro_batch_size": 1, "num_workers": 2, "strategy": strategy}})
    task = CausalLM(spec)
    task.__dict__["vocab"] = VOCAB  # the tiny model's own vocabulary: no tokenizer file
    task.load_teacher = lambda device: _tiny_lm(1)
    return task


def _sharded_cases(rank: int, teacher_weights: str):
    """The teacher's signal on this rank's rows, from a colocated teacher unsharded (ddp) and sharded (fsdp)."""
    from sklearn.datasets import load_digits

    from kd_ray.tasks.classify import Classify
    from kd_ray.train.colocated import ColocatedTeacher

    cpu = torch.device("cpu")
    x = torch.tensor(load_digits().data[rank * 64:(rank + 1) * 64], dtype=torch.float32).reshape(-1, 1, 8, 8) * 0.0625
    rows = _batches()[rank * 4:(rank + 1) * 4]
    lm_batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def classify(strategy: str):
        spec = _classify_spec(teacher_weights, strategy)
        teacher = ColocatedTeacher(spec, Classify(spec), cpu)
        sharded = any(hasattr(p, "full_tensor") for p in teacher.model.parameters())
        return sharded, teacher({X: x})[TEACHER]

    def lm(strategy: str):
        task = _lm_task(strategy)
        teacher = ColocatedTeacher(task.spec, task, cpu)
        sharded = any(hasattr(p, "full_tensor") for p in teacher.model.parameters())
        out = teacher(lm_batch)  # its top-k columns (made up for test_lm's loss tests) replaced by the teacher's
        return sharded, {k: out[k] for k in (TOPK_VALUES, TOPK_INDICES, TAIL_LSE, TARGET_LOGPROB)}

    return [(f"{name} {s}", functools.partial(fn, s)) for name, fn in (("classify", classify), ("lm", lm)) for s in ("ddp", "fsdp")]


def test_sharded_colocated_teacher_sends_the_unsharded_signal(teacher_weights, tmp_path):
    results = spawn_gloo(functools.partial(_sharded_cases, teacher_weights=teacher_weights), 2, str(tmp_path), 300)
    for rank, result in enumerate(results):
        for task in ("classify", "lm"):
            whole, sharded = result[f"{task} ddp"], result[f"{task} fsdp"]
            assert isinstance(whole, tuple) and isinstance(sharded, tuple), f"rank {rank} {task}:\n{whole}\n{sharded}"
            assert not whole[0] and sharded[0]  # the second one is sharded, the first is not
            torch.testing.assert_close(sharded[1], whole[1], rtol=0, atol=1e-5, msg=lambda m: f"rank {rank} {task}: {m}")


# ------------------------------------------------------------------------------ what cannot work


def test_colocated_with_a_cache_is_one_line(teacher_weights, tmp_path):
    from kd_ray.checks import check_teacher_placement

    spec = _classify_spec(teacher_weights, "ddp")
    spec.teacher.mode = "cached"
    with pytest.raises(UserError) as e:
        check_teacher_placement(spec)
    assert e.value.field == "teacher.placement" and "teacher.mode: cached" in e.value.message
    spec.teacher.mode, spec.teacher.precision = "online", "fp16"
    with pytest.raises(UserError) as e:
        check_teacher_placement(spec)
    assert e.value.field == "teacher.precision" and "train.use_gpu" in e.value.message


def test_a_teacher_that_cannot_fit_is_one_line():
    from kd_ray.train.colocated import check_fits

    gib = 2 ** 30
    check_fits(4 * gib, 1, 16 * gib)
    with pytest.raises(UserError) as e:
        check_fits(16 * gib, 1, 20 * gib)
    assert e.value.field == "teacher.placement" and "16.00 GiB" in e.value.message and "pool" in e.value.message
    check_fits(16 * gib, 2, 20 * gib)  # sharded over 2 workers: 8 GiB each
