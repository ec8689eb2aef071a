"""The teacher-output cache (kd_ray.cache): format, capture, checks, and training from it.

The format and the reader are tested without Ray; capture and cached training on the session's
real Ray cluster, with the session's trained digits teacher. Captures are shared per module
where a test only reads them (copied where a test damages or edits one).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import conftest
import faults
import numpy as np
import pytest
import torch
from conftest import ROOT, TEACHER_SPEC, run_cli, run_here, write_job

from kd_ray.cache import files as shards
from kd_ray.cache import manifest as cache
from kd_ray.cache.capture import capture
from kd_ray.cache.reader import CacheReader
from kd_ray.cache.samples import SampleCodec, encode, shard_table
from kd_ray.core import hashing
from kd_ray.core.columns import ID, INPUT, ROW, TAIL_LSE, TEACHER, X
from kd_ray.losses import distill_loss, topk_compress
from kd_ray.models.registry import build_model
from kd_ray.models.weights import load_into, read_state_dict, save

FULL = dict(format="full", dtype="float32", k=None, temperatures=None, classes=10)
TOPK = dict(format="topk", dtype="bfloat16", k=4, temperatures=[2.0], classes=10)


def kd_job(tmp_path, name: str, teacher_weights: str, cache_block: dict, mode: str = "cached", **train) -> dict:
    """conftest's digits KD job with a teacher cache (and a pool of one actor for captures)."""
    job = conftest.kd_job(tmp_path, name, teacher_weights, **train)
    job["teacher"].update(pool={"min_actors": 1, "max_actors": 1, "batch_size": 64}, mode=mode, cache=cache_block)
    return job


def teacher_logits(teacher_weights: str, x: np.ndarray) -> np.ndarray:
    teacher = build_model(TEACHER_SPEC["model"], TEACHER_SPEC["kwargs"])
    load_into(teacher, teacher_weights)
    with torch.inference_mode():
        return teacher.eval()(torch.from_numpy(x)).numpy()


def shards_of(path: str) -> dict[str, bytes]:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path)) if n.endswith(".parquet")}


# ---------------------------------------------------------------- the format, without Ray


@pytest.mark.parametrize("outputs", [FULL, {**FULL, "dtype": "float16"}, TOPK, {**TOPK, "dtype": "float16", "temperatures": [1.0, 4.0]},
                                     {**TOPK, "classes": 1000, "k": 20}], ids=["full32", "full16", "topk_bf16", "topk16", "topk1000"])
def test_shard_round_trip_and_same_bytes(outputs):
    logits = torch.randn(37, outputs["classes"], generator=torch.Generator().manual_seed(0)) * 4
    columns = encode(logits, outputs)
    digests = hashing.input_digests(np.random.default_rng(0).random((37, 1, 8, 8), dtype=np.float32))
    data = shards.to_parquet(shard_table(np.arange(37) * 7, digests, columns))
    same = shards.to_parquet(shard_table(np.arange(37) * 7, digests.copy(), encode(logits, outputs)))
    assert same == data  # a unit's shard is one byte string
    back = shards.decode(data)
    np.testing.assert_array_equal(back[ID], np.arange(37) * 7)
    np.testing.assert_array_equal(back[ROW], np.arange(37))
    assert back[INPUT].dtype == np.uint64
    np.testing.assert_array_equal(back[INPUT], digests)
    for name, values in columns.items():
        assert back[name].dtype == values.dtype and back[name].shape == values.shape
        np.testing.assert_array_equal(back[name], values)
    assert set(SampleCodec(outputs).schema()) == set(back)


def test_input_digests_tell_rows_apart_by_value_dtype_and_shape():
    x = np.random.default_rng(1).random((50, 3, 4), dtype=np.float32)
    d = hashing.input_digests(x)
    assert len(set(d.tolist())) == 50
    np.testing.assert_array_equal(d, hashing.input_digests(x.copy()))
    np.testing.assert_array_equal(d[[4, 2]], hashing.input_digests(x[[4, 2]]))  # a row's digest is its own
    y = x.copy()
    y[7, 2, 3] = np.nextafter(y[7, 2, 3], np.float32(2))  # the smallest change a float32 allows
    assert (hashing.input_digests(y) != d).tolist() == [i == 7 for i in range(50)]
    assert not (hashing.input_digests(x.astype(np.float64)) == d).any()
    assert not (hashing.input_digests(x.reshape(50, 4, 3)) == d).any()
    assert not (hashing.input_digests(np.asfortranarray(x)) != d).any()  # the values count, not the memory layout


def test_input_digests_see_every_word_of_long_and_odd_rows(monkeypatch):
    # Rows longer than one numpy call's share of words, and rows whose bytes are not whole words.
    monkeypatch.setattr(hashing, "_DIGEST_BYTES", 3 * 8 * 1000)  # 1,000 words of each of the 3 rows per call
    long = np.random.default_rng(2).integers(0, 50_000, (3, 2 * 2 * 1000 + 5), dtype=np.int32)
    d = hashing.input_digests(long)
    monkeypatch.setattr(hashing, "_DIGEST_BYTES", 32 << 20)  # one call: the same digests
    np.testing.assert_array_equal(hashing.input_digests(long), d)
    monkeypatch.setattr(hashing, "_DIGEST_BYTES", 3 * 8 * 1000)
    for col in (0, 2 * 1000 - 1, 2 * 1000, long.shape[1] - 1):  # in the first call, either side of a cut, in the tail
        changed = long.copy()
        changed[1, col] += 1
        assert (hashing.input_digests(changed) != d).tolist() == [False, True, False]
    swapped = long.copy()
    swapped[0, [0, 1, 2, 3]] = swapped[0, [2, 3, 0, 1]]  # the same two 8-byte words in each other's places
    assert (swapped[0, :2] != long[0, :2]).any() and hashing.input_digests(swapped)[0] != d[0]
    odd = np.arange(15, dtype=np.uint8).reshape(3, 5)  # 5 bytes a row: padded within the digest only
    assert len(set(hashing.input_digests(odd).tolist())) == 3
    assert hashing.input_digests(odd[:0]).shape == (0,)


def test_cached_topk_reaches_the_loss_as_topk_compress_gives_it(tmp_path):
    """encode -> shard on disk -> CacheReader (rows picked across units, the job's tail column)
    -> tensors -> micro_step's teacher_output: the same TopK, and loss, as compressing live."""
    from kd_ray.teacher_signal import teacher_output

    outputs = {**TOPK, "temperatures": [1.0, 2.0, 4.0]}
    store = shards.Store(str(tmp_path))
    logits = [torch.randn(n, 10, generator=torch.Generator().manual_seed(n)) * 3 for n in (5, 8)]
    inputs = [np.random.default_rng(n).random((n, 64), dtype=np.float32) for n in (5, 8)]
    files = {}
    for unit, z in enumerate(logits):
        data = shards.to_parquet(shard_table(np.arange(len(z)) + 100 * unit, hashing.input_digests(inputs[unit]), encode(z, outputs)))
        files[unit] = shards.shard_name("source", unit, hashing.sha256(data))
        store.write(files[unit], data)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    reader = CacheReader("source", store, SampleCodec(outputs, temperature=4.0), files, keep=False)
    units, rows = np.array([1, 0, 1, 0]), np.array([7, 2, 0, 4])
    x = np.stack([inputs[u][r] for u, r in zip(units, rows)])
    columns = reader.read(units, rows, {ID: units * 100 + rows, X: x})
    assert columns[TAIL_LSE].shape == (4, 1)
    got = teacher_output({k: torch.from_numpy(v) for k, v in columns.items()}, temperature=4.0)
    live = topk_compress(torch.stack([logits[u][r] for u, r in zip(units, rows)]), 4, temperatures=4.0, dtype=torch.bfloat16)
    assert got.values.dtype == torch.bfloat16
    for a, b in zip(got[:3], live[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    student, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    kw = dict(temperature=4.0, alpha=0.5, denominator=4.0)
    torch.testing.assert_close(distill_loss(student, got, labels, **kw).loss, distill_loss(student, live, labels, **kw).loss)
    with pytest.raises(RuntimeError, match=r"^data.source: 4 of 4 rows read \(the first with id 108\) differ from the inputs"):
        reader.read(units, rows, {ID: units * 100 + rows + 1, X: x})
    x[2, 5] += 1  # the source rewritten under the cache: same ids, another input
    with pytest.raises(RuntimeError, match=r"^data.source: 1 of 4 rows read \(the first with id 100\) .* `kd-ray cache JOB.yaml` again$"):
        reader.read(units, rows, {ID: units * 100 + rows, X: x})


def test_mismatch_rules():
    job = {"teacher": {"model": "convnet", "kwargs": {"width": 16}, "weights_sha256": "a" * 64},
           "inputs": {"features": "x", "shape": [1, 8, 8], "preprocess": {"scale": 0.0625, "mean": 0.0, "std": 1.0}},
           "outputs": dict(TOPK), "data": {"source": {"rows": 10, "units": 1, "digest": "d" * 32}, "eval_source": None}}
    assert cache.mismatch(job, job, temperature=None) is None
    assert cache.mismatch(job, job, temperature=2.0) is None
    changed = json.loads(json.dumps(job))
    changed["teacher"]["weights_sha256"] = "b" * 64
    field, detail = cache.mismatch(job, changed, temperature=2.0)
    assert field == "teacher.weights" and "sha256 aaaaaaaaaaaa" in detail and "sha256 bbbbbbbbbbbb" in detail
    assert cache.mismatch(job, job, temperature=4.0)[0] == "distill.temperature"
    wider = json.loads(json.dumps(job))
    wider["outputs"]["temperatures"] = [2.0, 4.0]
    assert cache.mismatch(wider, job, temperature=2.0) is None  # training: any cached temperature serves
    assert cache.mismatch(wider, job, temperature=None)[0] == "teacher.cache.temperatures"  # capture: exactly the same


# ---------------------------------------------------------------- captures, shared by the tests below


def _capture(spec) -> dict:
    lines: list[str] = []
    summary = capture(spec, echo=lines.append)
    print("\n".join(lines))
    return summary


@pytest.fixture(scope="module")
def full_cache(ray_cluster, teacher_weights, tmp_path_factory):
    """Full fp32 logits of the digits job (2 shards: the in-memory source's units of 1024 rows)."""
    from kd_ray.checks import validate

    tmp = tmp_path_factory.mktemp("full_cache")
    job = kd_job(tmp, "capture", teacher_weights, {"path": str(tmp / "cache")})
    summary = _capture(validate(job, job_dir=str(tmp)))
    return {"path": str(tmp / "cache"), "summary": summary}


@pytest.fixture(scope="module")
def topk_cache(ray_cluster, teacher_weights, tmp_path_factory):
    from kd_ray.checks import validate

    tmp = tmp_path_factory.mktemp("topk_cache")
    block = {"path": str(tmp / "cache"), "format": "topk", "k": 4, "dtype": "bfloat16", "temperatures": [2.0]}
    summary = _capture(validate(kd_job(tmp, "capture", teacher_weights, block), job_dir=str(tmp)))
    return {"path": block["path"], "block": block, "summary": summary}


def test_capture_holds_the_teachers_outputs(full_cache, teacher_weights):
    from sklearn.datasets import load_digits

    manifest = json.load(open(os.path.join(full_cache["path"], cache.MANIFEST)))
    assert manifest["status"] == "complete" and manifest["rows"] == 1797 and manifest["kd_ray_version"]
    assert [(s["part"], s["unit"], s["rows"]) for s in manifest["shards"]] == [("source", 0, 1024), ("source", 1, 773)]
    assert manifest["teacher"]["model"] == "convnet" and manifest["outputs"]["format"] == "full"
    assert manifest["schema"] == {"id": "int64", "row": "int32", "input_digest": "uint64",
                                  "teacher_logits": "fixed_size_list<item: float>[10]"}
    files = shards_of(full_cache["path"])
    assert sorted(files) == sorted(s["file"] for s in manifest["shards"])
    for s in manifest["shards"]:
        assert hashing.sha256(files[s["file"]]) == s["sha256"]
    columns = [shards.decode(files[s["file"]]) for s in manifest["shards"]]
    ids = np.concatenate([c[ID] for c in columns])
    np.testing.assert_array_equal(ids, np.arange(1797))  # every sample, train and eval rows alike
    x, _ = load_digits(return_X_y=True)
    x = x.astype(np.float32).reshape(-1, 1, 8, 8)  # as the source gives it (data.shape), before preprocessing
    np.testing.assert_array_equal(np.concatenate([c[INPUT] for c in columns]), hashing.input_digests(x))
    direct = teacher_logits(teacher_weights, x * 0.0625)
    np.testing.assert_allclose(np.concatenate([c[TEACHER] for c in columns]), direct, rtol=1e-5, atol=1e-5)
    s = full_cache["summary"]
    print(f"\ndigits full fp32: {s['bytes_per_sample']:.1f} bytes/sample on disk, payload {s['payload_bytes_per_sample']}; "
          f"capture {s['samples_per_second']} samples/s ({s['seconds']} s, pool start-up included)")


def test_cached_run_equals_online_run(ray_cluster, online_kd_run, full_cache, tmp_path):
    """The session's online run, trained again from a full fp32 cache of the same teacher. The
    tolerance: on CPU this teacher's logits do not depend on how rows are batched (the pool
    batches shuffled chunks, the capture each unit in order; measured bitwise equal), so both
    runs do the same arithmetic and end with the same weights; 1e-6 leaves room only for float
    summation order."""
    from kd_ray.checks import validate
    from kd_ray.job import run

    assert online_kd_run["proc"].returncode == 0, online_kd_run["proc"].stderr[-3000:]
    job = copy.deepcopy(online_kd_run["job"])
    job["run"].update(name="cached", storage_path=str(tmp_path / "runs"))
    job["teacher"].update(mode="cached", cache={"path": full_cache["path"]})
    lines: list[str] = []
    cached = run(validate(job, job_dir=str(tmp_path)), echo=lines.append)
    assert cached["status"] == "finished", lines
    assert any("2 shards checked" in line for line in lines)
    online = json.load(open(online_kd_run["run_dir"] / "summary.json"))
    conftest.assert_trained_alike(cached, online)
    print(f"\nsamples/s: online {online['samples_per_second']}, cached {cached['samples_per_second']}")


def _teacher_pool_actors() -> int:
    from ray.util.state import list_actors

    return sum(any(c in (a.class_name or "") for c in ("TeacherPredictor", "ReadingTeacher")) for a in list_actors(limit=10_000))


def test_topk_cached_run_resumes_after_a_worker_death(ray_cluster, topk_cache, teacher_weights, tmp_path):
    """Top-k bf16 cache, FSDP2, bf16 autocast, 2 workers x accumulation 4: a worker dies at step 12, the group
    restarts from the step-10 checkpoint and the run ends with every step in order (the loop
    checks each micro-batch's positions), no teacher pool ever started."""
    from kd_ray.checks import validate
    from kd_ray.job import run

    marks = tmp_path / "marks"
    marks.mkdir()
    job = kd_job(tmp_path, "topk", teacher_weights, topk_cache["block"], micro_batch_size=8, strategy="fsdp", precision="bf16", epochs=1)
    job["checkpoint"] = {"every_steps": 5}
    faults.install(tmp_path)
    job["callbacks"] = [{"callable": "faults:DieAt", "kwargs": {"steps": [12], "marks": str(marks)}}]
    pools = _teacher_pool_actors()
    lines: list[str] = []
    summary = run(validate(job, job_dir=str(tmp_path)), echo=lines.append)
    assert summary["status"] == "finished", lines
    assert summary["restarts"] == 1 and summary["accumulation"] == 4 and os.listdir(marks) == ["died_at_12"]
    assert summary["student"]["accuracy"] > 0.5  # 22 steps: the same job online reaches ~0.6 (chance: 0.1)
    assert summary["teacher"]["accuracy"] > 0.9 and summary["teacher"]["loss"] is None  # top-1 exact; no p(label) past the top k
    assert _teacher_pool_actors() == pools
    assert any("top-4 bfloat16" in line for line in lines)


# ---------------------------------------------------------------- every mismatch: exit 2, one line


def _copy_cache(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_manifest(path: str, edit) -> None:
    with open(os.path.join(path, cache.MANIFEST)) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(os.path.join(path, cache.MANIFEST), "w") as f:
        json.dump(manifest, f)


def _refused(capsys, tmp_path, job: dict, field: str, *overrides: str) -> str:
    """`kd-ray run` exits 2 with one line naming `field`, before any training."""
    from kd_ray.cli import main

    path = write_job(tmp_path / "job.yaml", job)
    code = main(["run", path, *overrides])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"kd-ray: error: {field}: "), (code, err, out[-2000:])
    assert "start:" not in out and not (tmp_path / "runs" / job["run"]["name"]).exists()  # no worker started, nothing written
    return lines[0]


def _perturbed_weights(teacher_weights: str, path) -> str:
    state = read_state_dict(teacher_weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1e-3
    save(state, str(path))
    return str(path)


def _digits_npz(path, change_one_pixel: bool) -> str:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    if change_one_pixel:
        x[5, 10] += 1
    np.savez(path, x=x, y=y)
    return str(path)


MISMATCHES = {
    # case: (field named, how the job or the cache differs)
    "weights": "teacher.weights",
    "kwargs": "teacher.kwargs",
    "model": "teacher.model",
    "preprocess": "data.preprocess",
    "data": "data.source",
    "format": "teacher.cache.format",
    "dtype": "teacher.cache.dtype",
    "k": "teacher.cache.k",
    "temperature": "distill.temperature",
    "no_manifest": "teacher.cache.path",
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_each_mismatch_is_refused_in_one_line(case, ray_cluster, teacher_weights, full_cache, topk_cache, tmp_path, capsys):
    source = topk_cache if case in ("k", "temperature") else full_cache
    block = dict(source.get("block", {"path": source["path"]}))
    block["path"] = _copy_cache(source["path"], tmp_path / "cache")
    job = kd_job(tmp_path, f"mismatch_{case}", teacher_weights, block)
    overrides: list[str] = []
    if case == "weights":
        job["teacher"]["weights"] = _perturbed_weights(teacher_weights, tmp_path / "other.safetensors")
    elif case == "kwargs":
        _edit_manifest(block["path"], lambda m: m["teacher"]["kwargs"].update(width=32))
    elif case == "model":
        _edit_manifest(block["path"], lambda m: m["teacher"].update(model="mymodels:net"))
    elif case == "preprocess":
        overrides.append("data.preprocess.scale=0.0625001")
    elif case == "data":
        job["data"]["source"] = _digits_npz(tmp_path / "digits.npz", change_one_pixel=True)
    elif case == "format":
        overrides += ["teacher.cache.format=topk", "teacher.cache.k=4"]
    elif case == "dtype":
        overrides.append("teacher.cache.dtype=float16")
    elif case == "k":
        overrides.append("teacher.cache.k=3")
    elif case == "temperature":
        overrides += ["distill.temperature=4.0", "teacher.cache.temperatures=null"]
    elif case == "no_manifest":
        os.remove(os.path.join(block["path"], cache.MANIFEST))
    line = _refused(capsys, tmp_path, job, MISMATCHES[case], *overrides)
    print(f"\n{case}: {line}")


def test_data_identity_is_the_content_not_the_path(teacher_weights, full_cache, tmp_path):
    """The digits as a user's .npz match the cache of the built-in digits; one pixel changed does not."""
    from kd_ray.checks import validate
    from kd_ray.data.chunks import Sources
    from kd_ray.tasks.build import task_for

    def data_identity(source: str) -> dict:
        job = kd_job(tmp_path, "data", teacher_weights, {"path": full_cache["path"]})
        job["data"]["source"] = source
        spec = validate(job, job_dir=str(tmp_path))
        task = task_for(spec)
        return cache.identity(spec, task, Sources(spec, task))[0]["data"]["source"]

    manifest = json.load(open(os.path.join(full_cache["path"], cache.MANIFEST)))
    same = data_identity(_digits_npz(tmp_path / "same.npz", change_one_pixel=False))
    assert same == manifest["data"]["source"] != data_identity(_digits_npz(tmp_path / "other.npz", change_one_pixel=True))


def test_augmentation_refuses_a_cache(ray_cluster, teacher_weights, full_cache, tmp_path, capsys):
    from kd_ray.cli import main

    job = kd_job(tmp_path, "augmented", teacher_weights, {"path": full_cache["path"]})
    job["data"]["augment"] = {"noise_std": 0.1}
    proc = run_cli(["run", write_job(tmp_path / "job.yaml", job)], ray_cluster, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("kd-ray: error: data.augment: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert main(["cache", write_job(tmp_path / "job.yaml", job), "teacher.mode=online"]) == 2  # an online job may not capture one either
    assert capsys.readouterr().err.startswith("kd-ray: error: data.augment: ")


# ---------------------------------------------------------------- damaged caches


def test_corrupt_or_missing_shard_is_caught_before_training_and_recapture_repairs_it(
        ray_cluster, teacher_weights, full_cache, tmp_path, capsys):
    from kd_ray.checks import validate

    path = _copy_cache(full_cache["path"], tmp_path / "cache")
    original = shards_of(path)
    first, second = sorted(original)
    with open(os.path.join(path, second), "r+b") as f:  # one flipped byte in the middle of a shard
        f.seek(len(original[second]) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    job = kd_job(tmp_path, "damaged", teacher_weights, {"path": path})
    line = _refused(capsys, tmp_path, job, "teacher.cache.path")
    assert f"shard {second} " in line and "corrupt" in line and "kd-ray cache" in line
    os.remove(os.path.join(path, first))
    line = _refused(capsys, tmp_path, job, "teacher.cache.path")
    assert f"shard {first} " in line and "is missing" in line and "1 more" in line

    summary = _capture(validate(job, job_dir=str(tmp_path)))
    assert summary["written"] == 2 and summary["kept"] == 0
    assert shards_of(path) == original  # rewritten byte for byte


FAILING_TEACHER = """
from kd_ray.models import BUILTINS


def failing(base, **kwargs):
    model = BUILTINS[base](**kwargs)

    def fail(module, args):
        if len(args[0]) > 2:  # the job check's 2-sample shape probe passes; real batches do not
            raise ValueError("the teacher failed on a real batch (test)")

    model.register_forward_pre_hook(fail)
    return model
"""


def test_failed_capture_is_one_line_and_leaves_an_incomplete_cache(ray_cluster, teacher_weights, tmp_path):
    """A teacher that fails in the pool: exit 1, the user's exception in one line (not Ray's
    wrappers; the relayed worker logs may add their tracebacks), and a cache marked incomplete with
    nothing half-written."""
    (tmp_path / "failing_teacher.py").write_text(FAILING_TEACHER)
    job = kd_job(tmp_path, "failing", teacher_weights, {"path": str(tmp_path / "cache")})
    job["teacher"].update(model="failing_teacher:failing", kwargs={**TEACHER_SPEC["kwargs"], "base": TEACHER_SPEC["model"]})
    proc = run_here(["cache", write_job(tmp_path / "job.yaml", job)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    verdicts = [line for line in proc.stderr.splitlines() if line.startswith("kd-ray: ")]
    assert verdicts == ["kd-ray: cache failed: ValueError: the teacher failed on a real batch (test) (0 of 2 shards are whole "
                        "and kept; fix the cause and run `kd-ray cache JOB.yaml` again: it writes only the others)"], proc.stderr[-3000:]
    assert json.load(open(tmp_path / "cache" / cache.MANIFEST))["status"] == "incomplete"
    assert not [n for n in os.listdir(tmp_path / "cache") if n != cache.MANIFEST]


# ---------------------------------------------------------------- a capture killed part-way


def _digits_parquet(path, rows_per_group: int, change_one_pixel: bool = False) -> str:
    """Uncompressed, plain-encoded pages: a changed pixel keeps the file's size to the byte."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    if change_one_pixel:
        x[5, 10] += 1
    table = pa.table({"pixels": pa.array(x.tolist(), pa.list_(pa.float32(), 64)), "digit": y})
    pq.write_table(table, str(path), row_group_size=rows_per_group, compression="none", use_dictionary=False)
    return str(path)


def capture_killed_after_3_shards(job: dict, tmp_path, cluster) -> str:
    """Write `job` to tmp_path/job.yaml and run `kd-ray cache` on it, SIGKILLed by the tests'
    KillDriver callback in the pool actor right after its 3rd shard; returns the job file's path."""
    faults.install(tmp_path)
    pid_file = tmp_path / "driver.pid"
    job["callbacks"] = [{"callable": "faults:KillDriver",
                         "kwargs": {"after": 3, "pid_file": str(pid_file), "mark": str(tmp_path / "killed")}}]
    path = write_job(tmp_path / "job.yaml", job)
    proc = subprocess.Popen([sys.executable, "-m", "kd_ray", "cache", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cluster.env(), cwd=ROOT)
    (tmp_path / "driver.pid.tmp").write_text(str(proc.pid))
    os.replace(tmp_path / "driver.pid.tmp", pid_file)  # whole, or not there at all, for the callback
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == -9, stderr[-3000:]
    return path


def test_killed_capture_resumes_writing_only_the_missing_shards(ray_cluster, teacher_weights, tmp_path, capsys, background):
    """A parquet source of 9 row groups (9 shards). The capture process is SIGKILLed right after
    the 3rd shard is written (the tests' KillDriver callback in the pool actor), a half-written
    temporary is left next to the shards;
    the rerun keeps the whole shards untouched, writes only the others, and the cache equals
    one captured in one go, byte for byte."""
    from kd_ray.checks import validate
    from kd_ray.cli import main
    from kd_ray.data.sources import read_ids

    source = _digits_parquet(tmp_path / "digits.parquet", rows_per_group=200)
    job = kd_job(tmp_path, "killed", teacher_weights, {"path": str(tmp_path / "cache")})
    job["data"].update(source=source, features="pixels", labels="digit")
    # The cache captured in one go, to compare with: alongside, from the start.
    one_go = dict(job["teacher"]["cache"], path=str(tmp_path / "one_go"))
    one_go_job = {**job, "teacher": {**job["teacher"], "cache": one_go}}
    spec = validate(one_go_job, job_dir=str(tmp_path))
    whole = background(["cache", write_job(tmp_path / "one_go.yaml", one_go_job)], tmp_path / "one_go.log")
    path = capture_killed_after_3_shards(job, tmp_path, ray_cluster)
    cache_dir = tmp_path / "cache"
    assert json.load(open(cache_dir / cache.MANIFEST))["status"] == "incomplete"
    before = {n: os.stat(cache_dir / n) for n in os.listdir(cache_dir) if n.endswith(".parquet")}
    assert len(before) == 3  # one pool actor, stopped at its 3rd shard
    (cache_dir / ".tmp-0123456789ab-source-00008.0000000000000000.parquet").write_bytes(b"PAR1 half a shard")
    main(["run", path])  # an incomplete cache is refused before training
    assert "is incomplete" in capsys.readouterr().err

    proc = run_here(["cache", path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(before)} already whole; writing {9 - len(before)}" in proc.stdout, proc.stdout
    for name, st in before.items():  # kept, not rewritten
        now = os.stat(cache_dir / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not [n for n in os.listdir(cache_dir) if n.startswith(".tmp")]

    proc = run_here(["cache", path])  # complete: checked, nothing written
    assert proc.returncode == 0 and "nothing to write" in proc.stdout, proc.stdout + proc.stderr[-2000:]

    assert whole.wait(timeout=600) == 0, (tmp_path / "one_go.log").read_text()[-3000:]
    assert shards_of(str(cache_dir)) == shards_of(one_go["path"]) and len(shards_of(one_go["path"])) == 9
    resumed, whole = (json.load(open(os.path.join(p, cache.MANIFEST))) for p in (cache_dir, one_go["path"]))
    assert resumed["shards"] == whole["shards"] and resumed["status"] == whole["status"] == "complete"

    # The source rewritten in place with one pixel changed: same files, sizes and row groups, so
    # the manifest's digest of it (which reads no data pages) cannot tell; the run stops when the
    # stream reads the changed row, before it reaches the student. The attempt says why as it fails.
    size = os.path.getsize(source)
    _digits_parquet(source, rows_per_group=200, change_one_pixel=True)
    assert os.path.getsize(source) == size
    proc = run_here(["run", path, "train.epochs=1", "run.max_failures=0"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    why = f"RuntimeError: data.source: 1 of \\d+ rows read \\(the first with id {int(read_ids(source, spec.data)[5])}\\) differ"
    assert len(re.findall(rf"^worker \d failed: {why}", proc.stdout, re.M)) == 1, proc.stdout[-3000:]  # once, for 2 ranks
    verdicts = [line for line in proc.stderr.splitlines() if line.startswith("kd-ray: ")]
    assert len(verdicts) == 1 and re.match(rf"kd-ray: run failed: {why}", verdicts[0]), proc.stderr[-3000:]
    assert "the cache at" in verdicts[0] and "`kd-ray cache JOB.yaml` again" in verdicts[0], verdicts
