"""Runs, caches and data on object storage: a real S3 server (SeaweedFS, tests/s3_server.py) on
loopback, the session's real Ray cluster, real process deaths (tests/faults.py). No mock of S3
or of pyarrow: kd_ray reaches the bucket through pyarrow's S3 filesystem as it would reach AWS.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import cli, digits_job, run_here, write_job
from s3_server import S3Server
from test_fault_tolerance import (
    assert_exactly_once,
    hooks,
    surviving_steps,
    train_ids,
    wait_for_checkpoints,
    wait_until_no_actor,
)
from test_token_shards import corpus  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One S3 server for the module; its keys in this process's environment (the CLI's runs get
    them from here, and hand them to the cluster's workers)."""
    server = S3Server(str(tmp_path_factory.mktemp("s3")))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def s3_driver(ray_cluster, s3):
    """This process joined to the cluster again, as the CLI joins it when the S3 keys are in its
    environment: the same kd_ray.cluster._worker_env hands them to the job's workers (the
    cluster's own processes were started without them), so run_here can run jobs on the bucket.
    The runs that a test kills, and the first run of each test, still go through a CLI process of
    their own and its ensure_ray."""
    import ray

    from kd_ray.cluster import _worker_env

    ray.shutdown()
    ray.init(address=ray_cluster.address, log_to_driver=False, runtime_env=_worker_env())
    yield
    ray.shutdown()
    ray.init(address=ray_cluster.address, log_to_driver=False)


def bucket_json(uri: str) -> dict:
    from kd_ray.core import storage

    return json.loads(storage.read_bytes(uri))


@pytest.mark.slow
def test_run_in_a_bucket_survives_a_worker_and_a_driver_death(ray_cluster, s3, s3_driver, tmp_path):
    """run.storage_path on s3://: a worker dies after step 15 (the group resumes from the step-10
    checkpoint read back from the bucket), then the driver is SIGKILLed (a checkpoint its reaped
    workers were uploading may be left without all its objects) and the newest whole checkpoint
    damaged in the bucket; the same command warns, resumes from the one before and finishes with
    every epoch's samples trained once, its summary, student, checkpoints and metrics in the
    bucket; `kd-ray eval` scores the student there. Run again, the finished run is moved aside (a
    copied prefix) and a new one starts."""
    from kd_ray.core import storage
    from kd_ray.train import checkpoint

    job = digits_job(tmp_path, "in_bucket")
    job["run"].update(storage_path=s3.uri("runs"), deterministic=True)
    job["checkpoint"] = {"every_steps": 10, "keep": 3, "poll_every_steps": 2}
    job["train"]["epochs"] = 4
    job["callbacks"] = hooks(tmp_path, die_at=(15,))
    path = write_job(tmp_path / "in_bucket.yaml", job)
    run_dir = s3.uri("runs/in_bucket")

    proc = cli(["run", path], ray_cluster)
    wait_for_checkpoints(run_dir, 2, proc, after=15, timeout=400)
    os.kill(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    assert "from step 10 (data position 640)" in out, out[-3000:]
    wait_until_no_actor("RayTrainWorker")
    # The workers, reaped mid-upload, may have left a newest checkpoint without all its objects:
    # skipped as a damaged one is. The newest whole one is damaged here.
    newest, half_uploaded = checkpoint.pick(run_dir)
    weights = storage.join(newest, checkpoint.STUDENT_WEIGHTS)
    damaged = bytearray(storage.read_bytes(weights))
    damaged[200:264] = b"\0" * 64
    storage.write_bytes(weights, bytes(damaged))
    older, skipped = checkpoint.pick(run_dir)
    older_step = checkpoint.read_resume(older)["step"]
    assert [p for p, _ in skipped] == [p for p, _ in half_uploaded] + [newest], skipped

    proc = run_here(["run", path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"warning: checkpoint {storage.basename(newest)} cannot be used" in proc.stderr, proc.stderr[-3000:]  # warnings: stderr
    assert f"resuming run in_bucket from step {older_step}" in proc.stdout, proc.stdout[-3000:]
    summary = bucket_json(storage.join(run_dir, "summary.json"))
    assert summary["status"] == "finished" and summary["steps"] == 88 and summary["resumed_from_step"] == older_step, summary
    assert summary["student_weights"] == storage.join(run_dir, checkpoint.STUDENT_WEIGHTS)
    names = storage.listdir(run_dir)
    assert {"summary.json", "metrics.jsonl", "student.safetensors", "student.json", "tensorboard"} <= set(names), names
    assert [n for n in names if n.startswith("checkpoint_")], names
    assert not os.path.exists(tmp_path / "runs"), "nothing of the run is written locally"
    assert_exactly_once(surviving_steps(tmp_path / "trace"), 88, train_ids(tmp_path))
    print(f"resumed from the bucket: worker death at 15 -> step 10; driver killed ({len(half_uploaded)} checkpoint(s) "
          f"half-uploaded), newest whole one damaged -> step {older_step}; {summary}")

    proc = run_here(["eval", path])  # the exported student, read back from the bucket
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert abs(metrics["accuracy"] - summary["student"]["accuracy"]) < 0.02 and metrics["weights"].startswith("s3://")

    proc = run_here(["run", path, "train.max_steps=2", "callbacks=[]"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    moved = [n for n in storage.listdir(s3.uri("runs")) if n.startswith("in_bucket.")]
    assert len(moved) == 1 and f"previous run moved to s3://kd-ray/runs/{moved[0]}" in proc.stdout, proc.stdout[-2000:]
    assert bucket_json(s3.uri(f"runs/{moved[0]}/summary.json"))["steps"] == 88
    assert bucket_json(storage.join(run_dir, "summary.json"))["steps"] == 2


def test_paths_keep_a_uris_query_and_find_rays_working_dir_copy():
    from kd_ray.core import storage

    uri = "s3://b/runs/?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "run", "summary.json") == "s3://b/runs/run/summary.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.with_suffix(storage.join(uri, "run"), ".1") == "s3://b/runs/run.1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.basename(storage.join(uri, "run")) == "run" and storage.shown(uri) == "s3://b/runs/"
    assert storage.join("/a/b", "c") == "/a/b/c" and storage.with_suffix("/a/b", ".1") == "/a/b.1"
    copy = "/tmp/ray/session_2026/runtime_resources/working_dir_files/_ray_pkg_0a1b/runs"
    assert storage.in_job_working_dir(copy) and not storage.in_job_working_dir("/home/me/runs")
    assert not storage.in_job_working_dir("s3://b/runtime_resources/working_dir_files/x")


@pytest.mark.parametrize("case", ["endpoint", "credentials", "bucket", "working_dir"])
def test_storage_mistakes_are_one_line_before_anything_starts(case, s3, tmp_path, monkeypatch, capsys):
    """An endpoint nobody answers on, wrong keys, a missing bucket, and a relative storage path
    that resolves inside Ray's copy of a submitted job's --working-dir: one line naming the field
    and the fix, exit 2, before Ray starts, nothing written."""
    from kd_ray.cli import main

    job = digits_job(tmp_path, "mistake")
    job["run"]["storage_path"] = {"endpoint": s3.uri("runs").replace(s3.endpoint, "127.0.0.1:1"),
                                  "credentials": s3.uri("runs"), "bucket": s3.uri("runs", bucket="no-such-bucket"),
                                  "working_dir": "runs"}[case]
    where = tmp_path
    if case == "working_dir":  # the layout Ray unpacks a job's working directory into
        where = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    path = write_job(where / "jobs" / "mistake.yaml", job)
    if case == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert main(["run", path]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd-ray: error: run.storage_path: "), lines
    expected = {"endpoint": "endpoint_override", "credentials": "AWS_SECRET_ACCESS_KEY", "bucket": "no-such-bucket does not exist",
                "working_dir": "an absolute path every node shares, or an s3:// or gs:// URI"}[case]
    assert expected in lines[0], lines[0]
    assert not os.path.exists(where / "jobs" / "runs")


@pytest.mark.slow
def test_cache_and_parquet_data_and_teacher_in_a_bucket(ray_cluster, s3, s3_driver, teacher_weights, tmp_path):
    """Parquet data (9 row groups), the teacher's weights and its cache all in the bucket: the
    capture is SIGKILLed after its 3rd shard, the rerun writes only the 6 missing ones, and a run
    trains from the cache read back from the bucket."""
    from test_cache import _digits_parquet, capture_killed_after_3_shards
    from test_cache import kd_job as cached_job

    from kd_ray.cache import manifest as cache
    from kd_ray.core import storage

    source, weights = s3.uri("data/digits.parquet"), s3.uri("models/teacher.safetensors")
    storage.put(_digits_parquet(tmp_path / "digits.parquet", rows_per_group=200), source)
    storage.put(teacher_weights, weights)
    cache_dir = s3.uri("caches/digits")
    job = cached_job(tmp_path, "from_bucket", teacher_weights, {"path": cache_dir}, epochs=1)
    job["teacher"]["weights"] = weights
    job["data"].update(source=source, features="pixels", labels="digit")
    path = capture_killed_after_3_shards(job, tmp_path, ray_cluster)
    assert bucket_json(storage.join(cache_dir, cache.MANIFEST))["status"] == "incomplete"
    assert len([n for n in storage.listdir(cache_dir) if n.endswith(".parquet")]) == 3

    proc = run_here(["cache", path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 already whole; writing 6" in proc.stdout, proc.stdout
    assert bucket_json(storage.join(cache_dir, cache.MANIFEST))["status"] == "complete"

    proc = run_here(["run", path, "callbacks=[]"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cached outputs" in proc.stdout and "9 shards checked" in proc.stdout, proc.stdout[-3000:]
    summary = json.loads((tmp_path / "runs" / "from_bucket" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["student"]["accuracy"] > 0.5, summary


def test_lm_documents_and_token_shards_in_a_bucket(ray_cluster, s3, s3_driver, corpus, tmp_path):
    """A language model's documents (a prefix of JSON-lines files) and its token shards both in
    the bucket: `kd-ray prepare` writes them there, they hold the rows a local preparation of the
    same files holds, and a run trains from them."""
    import numpy as np
    from test_token_shards import _job, _prepare, _rows, _spec

    from kd_ray.core import storage
    from kd_ray.data.token_shards import Prepared

    lines = corpus["lines"].splitlines(keepends=True)
    local = tmp_path / "docs"
    local.mkdir()
    for i, part in enumerate((lines[:50], lines[50:120])):
        (local / f"part-{i}.jsonl").write_text("".join(part))
        storage.put(str(local / f"part-{i}.jsonl"), s3.uri(f"lm/docs/part-{i}.jsonl"))
    job = _job(corpus, s3.uri("lm/docs"), s3.uri("lm/prepared"))
    job["run"]["storage_path"] = str(tmp_path / "runs")
    path = write_job(tmp_path / "lm.yaml", job)
    proc = run_here(["prepare", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    digest = storage.listdir(s3.uri("lm/prepared"))
    assert len(digest) == 1 and "token shards at s3://" in proc.stdout, proc.stdout
    in_bucket = Prepared(s3.uri(f"lm/prepared/{digest[0]}"), bucket_json(s3.uri(f"lm/prepared/{digest[0]}/manifest.json")))
    here = _prepare(_spec(tmp_path, _job(corpus, local, tmp_path / "prepared")))
    for split in ("train", "eval"):
        a, b = _rows(in_bucket, split), _rows(here, split)
        assert len(a["id"]) and all(np.array_equal(a[k], b[k]) for k in a), split

    proc = run_here(["run", path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "lm" / "summary.json").read_text())["steps"] == 4
