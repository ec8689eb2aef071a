"""Bad inputs, as a careful new user makes them: each is ONE stderr line that names the
job-file field and the fix, exit 2, no traceback, a bounded length, and nothing the user made
(a finished run, a teacher-output cache) renamed, moved or changed.

Most cases go through the real CLI entry point as `kd-ray run` (in-process: no Ray starts, as
each must be refused before Ray does); the finished run and the cache beside the job are compared
byte for byte after each. Data checks that need a pass over parquet data run where the data is
read: those are tested on the reader itself, and through Ray's wrappers to the driver's exit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_lm import lm_files  # noqa: F401 (a fixture)
from test_spec import BASE, TEACHER, TEACHER_KWARGS, _isolated_imports, write_job  # noqa: F401 (a fixture)

from kd_ray.cli import main
from kd_ray.core.errors import LINE_CHARS, UserError
from kd_ray.models import convnet, weights

WITH_TEACHER = TEACHER + ["teacher.weights=teacher.safetensors"]
CACHED = WITH_TEACHER + ["teacher.mode=cached"]

MODELS_PY = """\
from kd_ray.models import mlp


def not_a_module(**kwargs):
    return "a string"
"""


HOOKS_PY = """\
from kd_ray.callbacks import Callback


class Every(Callback):
    def __init__(self, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every


class Exits(Callback):
    def __init__(self):
        raise SystemExit(4)


class Loose:
    def on_start(self, info):
        pass


def not_a_callback():
    return 42


NOT_CALLABLE = 3
"""


def _billion_laughs(levels: int = 9) -> str:
    """A 1 KB YAML file whose aliases name 10^levels values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + f"\nrun: {{name: *a{levels - 1}}}\n"


def _job_text(base: dict, extra: str) -> str:
    return yaml.safe_dump(base) + extra


def _data_files(d) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 64), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    np.savez(d / "ok.npz", x=x, y=y)
    (d / "random.npz").write_bytes(rng.bytes(300))
    (d / "random.npy").write_bytes(rng.bytes(300))
    np.save(d / "labels.npy", y)
    np.save(d / "object.npy", np.array([np.zeros(64), np.zeros(3)] + [np.zeros(64)] * 38, dtype=object), allow_pickle=True)
    np.savez(d / "strings.npz", x=np.array([["a"] * 64] * 40), y=y)
    np.savez(d / "negative.npz", x=x, y=np.where(np.arange(40) == 7, -1, y))
    np.savez(d / "beyond.npz", x=x, y=np.where(np.arange(40) == 5, 12, y))
    np.savez(d / "nan.npz", x=np.where(np.arange(40)[:, None] == 3, np.nan, x), y=y)
    np.savez(d / "inf.npz", x=np.where(np.arange(40)[:, None] == 9, np.inf, x), y=y)
    os.makedirs(d / "folder.npz")
    os.makedirs(d / "labels_dir.npy")
    ids = np.arange(40)
    ids[21] = 5
    pq.write_table(pa.table({"x": list(x), "y": y, "sid": ids}), d / "dup_ids.parquet")
    pq.write_table(pa.table({"x": [str(v) for v in range(40)], "y": y}), d / "strings.parquet")
    pq.write_table(pa.table({"x": pa.array(list(x), pa.list_(pa.float32(), 64)), "y": y}), d / "fixed.parquet")


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A job directory with the files the mistakes name, a finished run of the job and a
    teacher-output cache; Ray must not start (every case is refused before it would)."""
    import kd_ray.evaluate
    import kd_ray.job

    def no_ray(*args, **kwargs):
        raise AssertionError("the mistake got past validation: Ray was about to start")

    monkeypatch.setattr(kd_ray.job, "ensure_ray", no_ray)
    monkeypatch.setattr(kd_ray.evaluate, "ensure_ray", no_ray)
    weights.save(convnet(**TEACHER_KWARGS).state_dict(), str(tmp_path / "teacher.safetensors"))
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(500))
    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "hooks.py").write_text(HOOKS_PY)
    (tmp_path / "exiting_models.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "weights_dir").mkdir()
    _data_files(tmp_path)
    run = tmp_path / "runs" / "t"
    (run / "checkpoint_000000").mkdir(parents=True)
    (run / "checkpoint_000000" / "resume.json").write_text('{"step": 22}')
    (run / "summary.json").write_text(json.dumps({"status": "finished", "steps": 22}))
    (run / "student.safetensors").write_bytes(b"\x00student weights\x01")
    (tmp_path / "runs" / "file_run").write_text("a file where a run would go\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text('{"kd_ray_cache": 1}')
    (tmp_path / "cache" / "source-0.parquet").write_bytes(b"PAR1 a shard PAR1")
    (tmp_path / "bad_cache" / "manifest.json").mkdir(parents=True)
    write_job(tmp_path, BASE)
    return tmp_path


def _tree(root) -> dict:
    """Every file and directory under root with its bytes: what must not change."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root) + "/"] = None
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = f.read()
    return out


def _refused(capsys, argv: list[str], field: str, needles: list[str], root=None) -> str:
    """argv through the CLI: exit 2, one bounded line naming `field` first, no traceback, and the
    runs and the cache under root exactly as they were."""
    before = {p: _tree(os.path.join(root, p)) for p in ("runs", "cache")} if root else {}
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err[:2000]!r}"
    assert lines[0].startswith(f"kd-ray: error: {field}: "), lines[0]
    assert len(lines[0]) <= len("kd-ray: error: ") + LINE_CHARS
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    for p, tree in before.items():
        assert _tree(os.path.join(root, p)) == tree, f"{p} changed"
    assert not [n for n in os.listdir(os.path.join(root, "runs")) if n.startswith("t.")] if root else True
    return lines[0]


# (id, overrides of the base job, field, needles): `kd-ray run job.yaml OVERRIDES...`
OVERRIDES = [
    # the schema: numbers that are not numbers, out of range, or unbounded
    ("leading-dot-override", [".epochs=3"], "override", ["'.epochs=3'", "empty part"]),
    ("double-dot-override", ["train..epochs=3"], "override", ["empty part"]),
    ("epochs-true", ["train.epochs=true"], "train.epochs", ["must be a number, not true"]),
    ("lr-false", ["train.optimizer.lr=false"], "train.optimizer.lr", ["must be a number, not false"]),
    ("lr-inf", ["train.optimizer.lr=.inf"], "train.optimizer.lr", ["finite number"]),
    ("scale-nan", ["data.preprocess.scale=.nan"], "data.preprocess.scale", ["finite number"]),
    ("std-zero", ["data.preprocess.std=0"], "data.preprocess.std", ["must not be 0"]),
    ("std-list-with-zero", ["data.preprocess.std=[0]"], "data.preprocess.std", ["must not be 0"]),
    ("mean-list-inf", ["data.preprocess.mean=[.inf]"], "data.preprocess.mean.0", ["finite number"]),
    ("temperature-inf", ["distill.temperature=.inf"], "distill.temperature", ["finite number"]),
    ("betas-above-one", ["train.optimizer.betas=[2, 3]"], "train.optimizer.betas.0", ["less than 1"]),
    ("cpus-per-worker-inf", ["train.cpus_per_worker=.inf"], "train.cpus_per_worker", ["finite number"]),
    ("resources-nan", ["train.resources_per_worker={x: .nan}"], "train.resources_per_worker", ["finite number"]),
    ("seed-beyond-64-bits", [f"run.seed={2**64}"], "run.seed", ["less than 9223372036854775808"]),
    ("seed-negative", ["run.seed=-1"], "run.seed", ["greater than or equal to 0"]),
    ("run-name-too-long", ["run.name=" + "a" * 300], "run.name", ["at most 200 characters"]),
    ("huge-value-echoed", ["run.name=[" + ", ".join(["123456789"] * 5_000) + "]"], "run.name", ["valid string", "123456789, ...]"]),
    ("million-world-sizes", ["train.num_workers=[1, 1000000]"], "train.num_workers", ["(999998 in all)"]),
    # paths: a directory for a file, a file for a directory, a URL
    ("storage-path-a-file", ["run.storage_path=a_file"], "run.storage_path", ["a_file is a file"]),
    ("storage-path-under-a-file", ["run.storage_path=a_file/runs"], "run.storage_path", ["a_file is a file"]),
    ("run-dir-a-file", ["run.name=file_run"], "run.name", ["file_run is a file"]),
    ("weights-url", ["student.weights=https://example.com/w.safetensors"], "student.weights", ["is a URL"]),
    ("weights-a-directory", ["student.weights=weights_dir"], "student.weights", ["is a directory, not a file"]),
    ("weights-random-bytes", TEACHER + ["teacher.weights=random.safetensors"], "teacher.weights", ["cannot read", "random.safetensors"]),
    ("source-a-directory", ["data.source=folder.npz"], "data.source", ["is a directory, not a file"]),
    ("labels-npy-a-directory", ["data.source=labels.npy", "data.labels=labels_dir.npy"], "data.labels", ["labels_dir.npy is a directory"]),
    ("cache-path-a-file", CACHED + ["teacher.cache.path=a_file"], "teacher.cache.path", ["a_file is a file"]),
    ("cache-manifest-a-directory", CACHED + ["teacher.cache.path=bad_cache"], "teacher.cache.path", ["manifest.json is not a file"]),
    # models
    ("factory-not-a-module", ["student.model=models:not_a_module"], "student.model", ["returned str, not a torch.nn.Module"]),
    ("module-calls-sys-exit", ["student.model=exiting_models:net"], "student.model", ["calls sys.exit(3)"]),
    # data files
    ("npz-random-bytes", ["data.source=random.npz"], "data.source", ["cannot read", "random.npz"]),
    ("npy-random-bytes", ["data.source=random.npy", "data.labels=labels.npy"], "data.source", ["cannot read", "random.npy"]),
    ("npy-object-features", ["data.source=object.npy", "data.labels=labels.npy"], "data.source", ["cannot read", "Python objects"]),
    ("npz-string-features", ["data.source=strings.npz"], "data.features", ["<U1", "must be an array of numbers"]),
    ("negative-label", ["data.source=negative.npz"], "data.labels", ["row 7 of negative.npz has label -1"]),
    ("label-beyond-num-classes", ["data.source=beyond.npz", "data.num_classes=10"], "data.labels", ["row 5 of beyond.npz has label 12", "0..9"]),
    ("nan-feature", ["data.source=nan.npz"], "data.features", ["row 3 of nan.npz", "NaN or infinite"]),
    ("inf-feature", ["data.source=inf.npz"], "data.features", ["row 9 of inf.npz"]),
    ("parquet-string-features", ["data.source=strings.parquet", "data.shape=null"], "data.features", ["holds string"]),
    ("shape-negative", ["data.shape=[-8, -8]"], "data.shape.0", ["greater than or equal to 1", "-8"]),
    ("parquet-shape-product", ["data.source=fixed.parquet", "data.shape=[1, 8, 9]"], "data.shape", ["72 values", "has 64"]),
    ("parquet-duplicate-ids", ["data.source=dup_ids.parquet", "data.id_column=sid", "data.shape=null", "train.global_batch_size=8",
                               "train.micro_batch_size=4"], "data.id_column", ["id 5 appears more than once", "row 5", "row 21"]),
    # the data against the batch, before Ray starts
    ("global-batch-beyond-data", ["train.global_batch_size=2048"], "train.global_batch_size", ["larger than the", "training samples"]),
    ("eval-split-leaves-too-little", ["data.eval_split=0.99"], "data.eval_split", ["of the 1797 samples", "fewer than one global batch"]),
    ("eval-split-leaves-nothing", ["data.eval_split=0"], "data.eval_split", ["none of the 1797 samples to evaluate on"]),
]


# Bad inputs II (issue 30): switches, unused fields, callbacks built at validate, storage URIs.
# "{world}" in an override is the job's directory.
OVERRIDES_II = [
    # a switch given anything but true or false: pydantic would read "no" and 0 as it likes
    ("report-yes-quoted", ['logging.report="yes"'], "logging.report", ["must be true or false", "'yes'"]),
    ("report-no-quoted", ['logging.report="no"'], "logging.report", ["must be true or false", "'no'"]),
    ("tensorboard-one", ["logging.tensorboard=1"], "logging.tensorboard", ["must be true or false", "not 1"]),
    ("use-gpu-string", ['train.use_gpu="false"'], "train.use_gpu", ["must be true or false"]),
    ("hflip-string", ['data.augment.hflip="on"'], "data.augment.hflip", ["must be true or false"]),
    ("deterministic-zero", ["run.deterministic=0"], "run.deterministic", ["must be true or false"]),
    # fields the job's loss or task never reads
    ("beta-with-hinton", ["distill.beta=0.3"], "distill.beta", ["only applies to loss: jsd", "hinton"]),
    ("top-k-for-a-classifier", ["distill.top_k=5"], "distill.top_k", ["only applies to task: causal_lm"]),
    ("chunk-tokens-for-a-classifier", ["distill.chunk_tokens=64"], "distill.chunk_tokens", ["only applies to task: causal_lm"]),
    # callbacks, built once at validate as every worker will build them
    ("callback-unknown-kwarg", ["callbacks=[{callable: hooks:Every, kwargs: {evry: 3}}]"], "callbacks.0.kwargs",
     ["does not accept", "it takes: every"]),
    ("callback-constructor-raises", ["callbacks=[{callable: hooks:Every, kwargs: {every: 0}}]"], "callbacks.0.kwargs",
     ["failed: ValueError: every must be >= 1, got 0"]),
    ("callback-constructor-exits", ["callbacks=[{callable: hooks:Exits}]"], "callbacks.0.kwargs", ["failed: SystemExit"]),
    ("callback-returns-a-number", ["callbacks=[{callable: hooks:not_a_callback}]"], "callbacks.0.callable",
     ["returned int", "subclass of kd_ray.callbacks.Callback"]),
    ("callback-without-hooks", ["callbacks=[{callable: hooks:Loose}]"], "callbacks.0.callable", ["has no on_batch"]),
    ("callback-not-callable", ["callbacks=[{callable: hooks:NOT_CALLABLE}]"], "callbacks.0.callable", ["has no callable 'NOT_CALLABLE'"]),
    ("callback-module-missing", ["callbacks=[{callable: no_such_hooks:Every}]"], "callbacks.0.callable", ["cannot import module"]),
    ("second-callback-wrong", ["callbacks=[{callable: hooks:Every}, {callable: hooks:Every, kwargs: {every: -2}}]"],
     "callbacks.1.kwargs", ["every must be >= 1, got -2"]),
    # a classifier's kwargs its factory cannot build with
    ("mlp-hidden-a-string", ["student.kwargs.hidden=abc"], "student.kwargs", ["mlp(", "failed: TypeError", "fix student.kwargs"]),
    ("torchvision-kwarg-typo", ["student.model=resnet18", "student.kwargs={num_clases: 10}"], "student.kwargs",
     ["resnet18({'num_clases': 10}) failed", "num_clases"]),
    # storage URIs: no bucket, a local file:// path that cannot be a directory
    ("storage-s3-no-bucket", ["run.storage_path=s3://"], "run.storage_path", ["s3:// names no bucket", "s3://BUCKET/PATH"]),
    ("storage-s3-empty-bucket", ["run.storage_path=s3:///runs"], "run.storage_path", ["names no bucket"]),
    ("storage-gs-no-bucket", ["run.storage_path=gs://?endpoint_override=localhost:1"], "run.storage_path", ["gs:// names no bucket"]),
    ("storage-file-uri-under-a-file", ["run.storage_path=file://{world}/a_file/runs"], "run.storage_path",
     ["a_file is a file", "choose another path"]),
    ("cache-path-s3-no-bucket", CACHED + ["teacher.cache.path=s3:///cache"], "teacher.cache.path", ["names no bucket"]),
    ("weights-s3-no-bucket", ["student.weights=s3:///w.safetensors"], "student.weights", ["names no bucket"]),
    ("weights-file-uri-missing", ["student.weights=file:///nonexistent/x.safetensors"], "student.weights",
     ["/nonexistent/x.safetensors does not exist"]),
    ("source-file-uri-two-slashes", ["data.source=file://relative/x.parquet"], "data.source",
     ["is not a local path", "three slashes"]),
    ("storage-file-uri-empty", ["run.storage_path=file://"], "run.storage_path", ["file:// is not a local path"]),
    ("source-file-uri-missing", ["data.source=file:///nonexistent/x.parquet"], "data.source",
     ["file:///nonexistent/x.parquet does not exist"]),
    # a tracking server nobody answers at: MLflow's own retries held the run's start for minutes
    ("mlflow-server-not-answering", ["logging.mlflow.tracking_uri=http://127.0.0.1:1"], "logging.mlflow.tracking_uri",
     ["nothing answers at http://127.0.0.1:1", "connection refused", "remove logging.mlflow"]),
    ("mlflow-host-unknown", ["logging.mlflow.tracking_uri=https://mlflow.no-such-host.invalid"], "logging.mlflow.tracking_uri",
     ["nothing answers at https://mlflow.no-such-host.invalid"]),
]


def test_cases_are_distinct():
    for cases in (OVERRIDES, OVERRIDES_II):
        assert len({c[0] for c in cases}) == len(cases) and len({tuple(c[1]) for c in cases}) == len(cases)


@pytest.mark.parametrize("overrides, field, needles", [c[1:] for c in OVERRIDES_II], ids=[c[0] for c in OVERRIDES_II])
def test_each_mistake_of_the_second_probe_is_one_line(world, capsys, overrides, field, needles):
    _refused(capsys, ["run", str(world / "job.yaml"), *[o.replace("{world}", str(world)) for o in overrides]], field, needles, world)


@pytest.mark.parametrize("overrides, field, needles", [c[1:] for c in OVERRIDES], ids=[c[0] for c in OVERRIDES])
def test_each_mistake_is_one_line_and_nothing_is_touched(world, capsys, overrides, field, needles):
    _refused(capsys, ["run", str(world / "job.yaml"), *overrides], field, needles, world)


# (id, the job file's text (from the base job's YAML), needles): mistakes in the file itself
FILES = [
    ("latin-1", "run: {name: caf\xe9}\n".encode("latin-1"), ["not UTF-8 text", "byte 15 is 0xe9"]),
    ("utf-16", _job_text(BASE, "").encode("utf-16"), ["not UTF-8 text", "byte 0 is 0xff"]),
    ("nested-thousands-deep", ("a: " + "[" * 3000 + "]" * 3000 + "\n").encode(), ["nests sections thousands of levels deep"]),
    ("nested-past-the-limit", ("a: " + "[" * 100 + "]" * 100 + "\n").encode(), ["more than 64 deep"]),
    ("billion-laughs", _billion_laughs().encode(), ["more than 100,000 values"]),
    ("contains-itself", b"a: &a [*a]\n", ["more than 64 deep"]),
    ("duplicate-key", _job_text(BASE, "").replace("  epochs: 1\n", "  epochs: 1\n  epochs: 3\n").encode(),
     ["key 'epochs' appears twice", "line"]),
    ("duplicate-section", _job_text(BASE, "train: {epochs: 2, global_batch_size: 64, micro_batch_size: 32}\n").encode(),
     ["key 'train' appears twice"]),
]


@pytest.mark.parametrize("text, needles", [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_each_broken_job_file_is_one_line(world, capsys, text, needles):
    (world / "broken.yaml").write_bytes(text)
    _refused(capsys, ["run", str(world / "broken.yaml")], "job file", needles, world)


def test_billion_laughs_is_small_on_disk_and_in_the_message(world, capsys):
    assert len(_billion_laughs()) < 1300
    (world / "laughs.yaml").write_text(_job_text(BASE, "").replace("name: t", "name: *a8").replace("run:", _billion_laughs() + "x:"))
    line = _refused(capsys, ["validate", str(world / "laughs.yaml")], "job file", ["values"])
    assert len(line) < 400


def test_a_directory_as_the_job_file(world, capsys):
    _refused(capsys, ["run", str(world / "runs")], "job file", ["is a directory, not a file"], world)


@pytest.mark.parametrize("argv", [["validate"], ["run"]], ids=["validate", "run"])
def test_no_job_file_is_one_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "overrides" not in err, err
    assert err.startswith("kd-ray: error: job file: missing; give the path of a YAML job file"), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_storage_path_not_writable(world, capsys):
    locked = world / "locked"
    locked.mkdir(mode=0o500)
    _refused(capsys, ["validate", str(world / "job.yaml"), f"run.storage_path={locked}/runs"], "run.storage_path", ["cannot write"])


@pytest.mark.parametrize("weights_file, needles", [("random.safetensors", ["cannot read"]), ("teacher.safetensors", ["does not fit mlp"])],
                         ids=["corrupt", "another-model"])
def test_eval_refuses_weights_before_ray(world, capsys, weights_file, needles):
    _refused(capsys, ["eval", str(world / "job.yaml"), "--weights", str(world / weights_file)], "--weights", needles, world)


# ------------------------------------------------------------------------------------------------
# Parquet data checked where it is read: in the Ray task that reads each row group


def _reader(path, **data):
    from kd_ray.data.sources import open_source
    from kd_ray.spec import DataSpec

    return open_source(str(path), DataSpec(source=str(path), **data))


def _read_all(reader):
    sizes = [len(u) for u in reader.unit_ids()]
    units = np.repeat(np.arange(len(sizes)), sizes)
    rows = np.concatenate([np.arange(n) for n in sizes])
    return reader.read(units, rows)


PARQUET_ROWS = [
    ("ragged", lambda x, y: ([list(v) for v in x[:3]] + [list(x[3][:5])] + [list(v) for v in x[4:]], y), {}, "data.features",
     ["row 3 of", "shape (5,)", "row 0 holds (64,)"]),
    ("missing-features", lambda x, y: ([list(v) for v in x[:6]] + [None] + [list(v) for v in x[7:]], y), {}, "data.features",
     ["row 6 of", "shape None"]),
    ("nan", lambda x, y: (np.where(np.arange(len(x))[:, None] == 11, np.nan, x).tolist(), y), {}, "data.features",
     ["row 11 of", "NaN or infinite"]),
    ("negative-label", lambda x, y: (x.tolist(), np.where(np.arange(len(y)) == 2, -3, y)), {}, "data.labels", ["row 2 of", "label -3"]),
    ("label-beyond-classes", lambda x, y: (x.tolist(), np.where(np.arange(len(y)) == 17, 10, y)), {"num_classes": 10}, "data.labels",
     ["row 17 of", "label 10", "0..9"]),
]


@pytest.mark.parametrize("make, data, field, needles", [c[1:] for c in PARQUET_ROWS], ids=[c[0] for c in PARQUET_ROWS])
def test_parquet_rows_are_checked_as_they_are_read(tmp_path, make, data, field, needles):
    rng = np.random.default_rng(0)
    x, y = make(rng.random((20, 64)), rng.integers(0, 10, 20))
    pq.write_table(pa.table({"x": x, "y": y}), tmp_path / "d.parquet", row_group_size=8)
    with pytest.raises(UserError) as e:
        _read_all(_reader(tmp_path / "d.parquet", **data))
    assert e.value.field == field and str(tmp_path / "d.parquet") in e.value.message, e.value
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_a_data_mistake_raised_in_a_ray_task_ends_the_run_as_the_users(tmp_path):
    """A check raised in a read task or a train worker reaches the driver wrapped by Ray (a task
    error, a worker group's failures); the driver finds it, and the CLI exits 2 with its line."""
    import traceback

    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train import WorkerGroupError

    from kd_ray.core.errors import user_error_in

    def raised_in_a_task():
        try:
            try:
                raise UserError("data.labels", "row 2 of d.parquet has label -3")
            except UserError as e:
                raise UserCodeException("UDF failed to process a data block.") from e
        except Exception as e:
            return RayTaskError("MapBatches(read_chunks)", traceback.format_exc(), e).as_instanceof_cause()

    found = user_error_in(WorkerGroupError("Training failed", {1: raised_in_a_task(), 0: RuntimeError("other")}))
    assert (type(found), found.field, found.message) == (UserError, "data.labels", "row 2 of d.parquet has label -3")
    # An actor's UDF: Ray Data's UserCodeException reaches the driver without its cause; the
    # traceback's text still names the user's error.
    text = ("Traceback (most recent call last):\n  File \"worker_hooks.py\", line 9, in on_shard_written\n"
            "kd_ray.core.errors.UserError: callbacks.0.kwargs: most: 0 shards per actor; raise it\n")
    lost = RayTaskError("MapWorker(MapBatches(ShardWriter)).submit()", text, UserCodeException("UDF failed to process a data block."))
    found = user_error_in(lost.as_instanceof_cause())
    assert (found.field, found.message) == ("callbacks.0.kwargs", "most: 0 shards per actor; raise it"), found
    assert user_error_in(RuntimeError("a bug")) is None
    import pickle

    again = pickle.loads(pickle.dumps(UserError("data.labels", "row 2")))  # as it crosses from a task
    assert (again.field, again.message) == ("data.labels", "row 2")


# ------------------------------------------------------------------------------------------------
# Found only after Ray has started: on the session's cluster, in this process


def test_a_finished_run_is_not_moved_for_a_mistake_found_after_ray_starts(ray_cluster, lm_files, tmp_path, capsys):
    """A language model's global batch is checked against its rows, which only tokenizing (in
    Ray Data tasks) gives: the one line, and the finished run as it was, where `kd-ray eval`
    finds it (it used to be moved to NAME.<timestamp>/ first)."""
    from conftest import write_job as write_yaml
    from test_lm import _lm_job

    job = _lm_job({**lm_files, "root": tmp_path})
    job["train"].update(global_batch_size=4096, micro_batch_size=2)
    run = tmp_path / "runs" / "m"
    (run / "student").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "finished"}))
    (run / "student" / "model.safetensors").write_bytes(b"weights")
    line = _refused(capsys, ["run", write_yaml(tmp_path / "job.yaml", job)], "train.global_batch_size", ["larger than the"], tmp_path)
    assert os.listdir(tmp_path / "runs") == ["m"], line
    # An eval split that leaves no held-out document, also known only once the rows are made.
    job["train"].update(global_batch_size=2)
    job["data"].update(eval_split=0.0)
    line = _refused(capsys, ["run", write_yaml(tmp_path / "job.yaml", job)], "data.eval_split", ["leaves no eval samples"], tmp_path)
    assert os.listdir(tmp_path / "runs") == ["m"], line


def test_a_bad_parquet_row_is_found_in_the_task_that_reads_it(ray_cluster, tmp_path):
    """A NaN in row 150 of a parquet source, seen only where its row group is read (a Ray Data
    task): the driver finds the user's mistake in Ray's wrappers (the run then ends with its one
    line, exit 2: kd_ray.job._failed)."""
    from conftest import digits_job

    from kd_ray.checks import validate
    from kd_ray.core.errors import user_error_in
    from kd_ray.data import streams
    from kd_ray.data.chunks import Sources
    from kd_ray.tasks.build import task_for

    rng = np.random.default_rng(0)
    x = rng.random((200, 64), dtype=np.float32)
    x[150, 3] = np.nan
    pq.write_table(pa.table({"x": list(x), "y": rng.integers(0, 10, 200)}), tmp_path / "d.parquet", row_group_size=50)
    job = digits_job(tmp_path, "nan")
    job["data"].update(source=str(tmp_path / "d.parquet"), features="x", labels="y", eval_source=str(tmp_path / "d.parquet"))
    spec = validate(job, job_dir=str(tmp_path))  # the schema, the columns and the row count pass: the values are not read
    with pytest.raises(Exception) as e:
        for _ in streams.build_eval(spec, Sources(spec, task_for(spec))).iter_batches(batch_size=None):
            pass
    found = user_error_in(e.value)
    assert found is not None and found.field == "data.features", repr(e.value)[:2000]
    assert found.message.startswith(f"row 150 of {tmp_path / 'd.parquet'} has a NaN"), found.message


# ------------------------------------------------------------------------------------------------
# Language models: the tokenizer, the vocabulary, the sequence length, the document columns


@pytest.fixture
def lm(lm_files, tmp_path, monkeypatch):
    import kd_ray.job

    monkeypatch.setattr(kd_ray.job, "ensure_ray", lambda *a, **k: pytest.fail("Ray was about to start"))
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "random.json").write_bytes(np.random.default_rng(2).bytes(200))
    _lm_mistake_files(tmp_path, lm_files)
    return {**lm_files, "tmp": tmp_path}


LM_MODELS_PY = """\
from kd_ray.models.lm import llama


def tiny(width: int = 16):
    return llama(vocab_size=400, hidden_size=width, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128)


def not_a_model():
    return "a string"
"""


def _lm_mistake_files(d, files) -> None:
    """Broken teacher files, weights of other models and documents of the wrong types."""
    import shutil

    from kd_ray.models.lm import llama

    rng = np.random.default_rng(3)
    (d / "bad.gguf").write_bytes(rng.bytes(400))
    shutil.copytree(files["teacher"], d / "cut_teacher")
    config = (d / "cut_teacher" / "config.json").read_text()
    (d / "cut_teacher" / "config.json").write_text(config[: len(config) // 2])
    (d / "no_config").mkdir()
    other = llama(vocab_size=300, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    weights.save(other.state_dict(), str(d / "other_lm.safetensors"))
    (d / "lm_models.py").write_text(LM_MODELS_PY)
    lines = {"array": "[1, 2]", "number-text": '{"text": 3}', "null-text": '{"text": null}', "list-text": '{"text": ["a", "b"]}',
             "float-tokens": '{"t": [1.5, 2]}', "nested-tokens": '{"t": [[1], [2]]}', "string-tokens": '{"t": "1 2 3"}'}
    for name, line in lines.items():
        (d / f"{name}.jsonl").write_text(line + "\n" + '{"text": "a", "t": [1]}\n')
    pq.write_table(pa.table({"text": list(range(10))}), d / "int_text.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "no_rows.parquet")
    pq.write_table(pa.table({"t": [[0.5, 1.0]] * 10}), d / "float_tokens.parquet")
    (d / "empty_source").mkdir()


LM_JOBS = [
    ("tokenizer-missing", lambda f, j: j["data"].update(tokenizer=str(f["tmp"] / "nope.json")), "data.tokenizer", ["neither"]),
    ("tokenizer-dir-without-one", lambda f, j: j["data"].update(tokenizer=str(f["tmp"] / "no_tokenizer")), "data.tokenizer",
     ["neither a tokenizer.json"]),
    ("tokenizer-random-bytes", lambda f, j: j["data"].update(tokenizer=str(f["tmp"] / "random.json")), "data.tokenizer", ["cannot load"]),
    ("max-seq-len-true", lambda f, j: j["data"].update(max_seq_len=True), "data.max_seq_len", ["not true"]),
    ("max-seq-len-one", lambda f, j: j["data"].update(max_seq_len=1), "data.max_seq_len", ["greater than or equal to 2"]),
    ("text-and-prompt", lambda f, j: j["data"].update(prompt="q", response="a"), "data.prompt", ["give one of"]),
    ("top-k-true", lambda f, j: j["distill"].update(top_k=True), "distill.top_k", ["not true"]),
    ("beta-nan", lambda f, j: j["distill"].update(beta=float("nan")), "distill.beta", ["finite number"]),
    ("jsonl-not-json", lambda f, j: j["data"].update(source=str(f["tmp"] / "random.json")), "data.source", ["line 1 of random.json", "UTF-8"]),
    ("cached-without-cache", lambda f, j: j["teacher"].update(mode="cached"), "teacher.cache", ["add teacher.cache"]),
    # Bad inputs II (issue 30). The models, built on the meta device at validate: every kwarg used,
    # heads in groups, weights that fit the architecture, and pretrained models taking no kwargs.
    ("student-kwargs-typo", lambda f, j: j["student"]["kwargs"].update(hiden_size=64), "student.kwargs",
     ["'hiden_size' is not a field", "did you mean 'hidden_size'?"]),
    ("student-kwargs-made-up", lambda f, j: j["student"]["kwargs"].update(depth=4), "student.kwargs", ["'depth' is not a field"]),
    ("kv-heads-do-not-divide", lambda f, j: j["student"]["kwargs"].update(num_key_value_heads=3, num_attention_heads=4, hidden_size=32),
     "student.kwargs", ["num_key_value_heads 3 does not divide num_attention_heads 4"]),
    ("kv-heads-more-than-heads", lambda f, j: j["student"]["kwargs"].update(num_key_value_heads=4), "student.kwargs",
     ["num_key_value_heads 4 does not divide num_attention_heads 2"]),
    ("unknown-activation", lambda f, j: j["student"]["kwargs"].update(hidden_act="gelu_nope"), "student.kwargs",
     ["cannot build llama", "gelu_nope"]),
    ("teacher-kwargs-for-pretrained", lambda f, j: j["teacher"].update(kwargs={"hidden_size": 64}), "teacher.kwargs",
     ["is a pretrained model", "remove teacher.kwargs"]),
    ("student-weights-of-the-teacher", lambda f, j: j["student"].update(weights=str(Path(f["teacher"]) / "model.safetensors")),
     "student.weights", ["does not fit llama"]),
    ("student-weights-of-another-llama", lambda f, j: j["student"].update(weights=str(f["tmp"] / "other_lm.safetensors")),
     "student.weights", ["other_lm.safetensors does not fit llama", "shape mismatch"]),
    ("teacher-weights-of-another-model", lambda f, j: j["teacher"].update(weights=str(f["tmp"] / "other_lm.safetensors")),
     "teacher.weights", ["does not fit"]),
    ("student-weights-random-bytes", lambda f, j: j["student"].update(weights=str(f["tmp"] / "random.json")), "student.weights",
     ["use a .safetensors or .pt state dict"]),
    ("student-weights-missing", lambda f, j: j["student"].update(weights=str(f["tmp"] / "nope.safetensors")), "student.weights",
     ["nope.safetensors does not exist"]),
    ("student-weights-a-directory", lambda f, j: j["student"].update(weights=str(f["tmp"] / "no_config")), "student.weights",
     ["is a directory, not a file"]),
    ("import-model-unknown-kwarg", lambda f, j: j["student"].update(model="lm_models:tiny", kwargs={"widht": 8}), "student.model",
     ["does not accept", "it takes: width"]),
    ("import-model-not-a-model", lambda f, j: j["student"].update(model="lm_models:not_a_model", kwargs={}), "student.model",
     ["returned str, not a torch.nn.Module"]),
    # the teacher's broken files are the teacher's, not data.tokenizer's
    ("teacher-gguf-missing", lambda f, j: j["teacher"].update(model=str(f["tmp"] / "nope.gguf")), "teacher.model",
     ["nope.gguf does not exist", "fix the path"]),
    ("teacher-gguf-not-gguf", lambda f, j: j["teacher"].update(model=str(f["tmp"] / "bad.gguf")), "teacher.model",
     ["cannot load", "bad.gguf", "fix or replace the model's files"]),
    ("teacher-config-cut-off", lambda f, j: j["teacher"].update(model=str(f["tmp"] / "cut_teacher")), "teacher.model",
     ["cannot load", "cut_teacher"]),
    ("teacher-dir-without-config", lambda f, j: j["teacher"].update(model=str(f["tmp"] / "no_config")), "teacher.model",
     ["is a directory without config.json"]),
    ("teacher-path-missing", lambda f, j: j["teacher"].update(model=str(f["tmp"] / "models" / "llama-8b")), "teacher.model",
     ["llama-8b does not exist"]),
    # documents and columns of the wrong type, from the schema or the first document
    ("jsonl-first-line-an-array", lambda f, j: j["data"].update(source=str(f["tmp"] / "array.jsonl")), "data.source",
     ["line 1 of array.jsonl", "a JSON list, not an object"]),
    ("text-a-number", lambda f, j: j["data"].update(source=str(f["tmp"] / "number-text.jsonl")), "data.text",
     ["holds 3 in column 'text'", "must be text"]),
    ("text-null", lambda f, j: j["data"].update(source=str(f["tmp"] / "null-text.jsonl")), "data.text", ["has no value in column 'text'"]),
    ("text-a-list", lambda f, j: j["data"].update(source=str(f["tmp"] / "list-text.jsonl")), "data.text", ["holds ['a', 'b']"]),
    ("tokens-floats", lambda f, j: j["data"].update(source=str(f["tmp"] / "float-tokens.jsonl"), text=None, tokens="t"), "data.tokens",
     ["[1.5, 2]", "list of token ids"]),
    ("tokens-nested", lambda f, j: j["data"].update(source=str(f["tmp"] / "nested-tokens.jsonl"), text=None, tokens="t"), "data.tokens",
     ["list of token ids"]),
    ("tokens-a-string", lambda f, j: j["data"].update(source=str(f["tmp"] / "string-tokens.jsonl"), text=None, tokens="t"),
     "data.tokens", ["'1 2 3'"]),
    ("parquet-text-integers", lambda f, j: j["data"].update(source=str(f["tmp"] / "int_text.parquet")), "data.text",
     ["holds 0 in column 'text'", "must be text"]),
    ("parquet-tokens-floats", lambda f, j: j["data"].update(source=str(f["tmp"] / "float_tokens.parquet"), text=None, tokens="t"),
     "data.tokens", ["holds [0.5, 1.0]", "list of token ids"]),
    ("parquet-no-rows", lambda f, j: j["data"].update(source=str(f["tmp"] / "no_rows.parquet")), "data.source", ["holds no documents"]),
    ("source-empty-directory", lambda f, j: j["data"].update(source=str(f["tmp"] / "empty_source")), "data.source",
     ["holds no parquet", "JSON-lines"]),
    # fields an LM job never reads
    ("beta-with-forward-kl", lambda f, j: j["distill"].update(loss="forward_kl", beta=0.2), "distill.beta", ["only applies to loss: jsd"]),
    ("classifier-shape", lambda f, j: j["data"].update(shape=[8]), "data.shape", ["only applies to task: classify"]),
    ("classifier-num-classes", lambda f, j: j["data"].update(num_classes=10), "data.num_classes", ["only applies to task: classify"]),
    ("lm-report-quoted", lambda f, j: j.update(logging={"report": "yes"}), "logging.report", ["must be true or false"]),
    ("lm-callback-kwargs", lambda f, j: j.update(callbacks=[{"callable": "lm_models:tiny", "kwargs": {"width": 8}}]),
     "callbacks.0.callable", ["returned LlamaForCausalLM", "has no on_start"]),
]


@pytest.mark.parametrize("mistake, field, needles", [c[1:] for c in LM_JOBS], ids=[c[0] for c in LM_JOBS])
def test_each_lm_job_mistake_is_one_line(lm, capsys, mistake, field, needles):
    import copy

    from conftest import write_job as write_yaml
    from test_lm import _lm_job

    job = copy.deepcopy(_lm_job(lm))
    job["run"]["storage_path"] = str(lm["tmp"] / "runs")
    os.makedirs(lm["tmp"] / "runs" / "m")
    (lm["tmp"] / "runs" / "m" / "summary.json").write_text('{"status": "finished"}')
    mistake(lm, job)
    _refused(capsys, ["run", write_yaml(lm["tmp"] / "job.yaml", job)], field, needles, lm["tmp"])


LM_ROWS = [
    ("bad-json-line", ['{"text": "a"}', '{"text": "b"}', '{"text": "c",'], {}, "data.source", ["line 3 of d.jsonl"]),
    ("latin-1-line", ['{"text": "a"}', '{"text": "caf\xe9"}'], {}, "data.source", ["line 2 of d.jsonl", "UTF-8"]),
    ("json-array-line", ['{"text": "a"}', '["b"]'], {}, "data.source", ["line 2 of d.jsonl", "list"]),
    ("null-text", ['{"text": "a"}'] * 4 + ['{"text": null}'], {}, "data.text", ["row 4 of d.jsonl has no value in column 'text'"]),
    ("column-missing-later", ['{"text": "a"}', '{"body": "b"}'], {}, "data.text", ["row 1 of d.jsonl has no value"]),
    ("number-text", ['{"q": "a", "r": "b"}', '{"q": 3, "r": "b"}'], {"text": None, "prompt": "q", "response": "r"}, "data.prompt",
     ["row 1 of d.jsonl holds 3", "must be text"]),
    ("string-token", ['{"t": [1, 2]}', '{"t": [1, "two"]}'], {"text": None, "tokens": "t"}, "data.tokens",
     ["row 1 of d.jsonl", "list of token ids"]),
    ("nested-token", ['{"t": [1, [2, 3]]}'], {"text": None, "tokens": "t"}, "data.tokens", ["row 0 of d.jsonl"]),
    ("negative-token", ['{"t": [1, -2]}'], {"text": None, "tokens": "t"}, "data.tokens", ["row 0 of d.jsonl"]),
    ("duplicate-id", ['{"text": "a", "i": 1}', '{"text": "b", "i": 2}', '{"text": "c", "i": 1}'], {"id_column": "i"}, "data.id_column",
     ["row 2 of d.jsonl repeats id 1"]),
]


@pytest.mark.parametrize("lines, data, field, needles", [c[1:] for c in LM_ROWS], ids=[c[0] for c in LM_ROWS])
def test_lm_documents_are_checked_as_they_are_read(tmp_path, lines, data, field, needles):
    """Read on the driver before tokenizing, before anything of the run is created or moved."""
    from kd_ray.data.text import first_documents
    from kd_ray.spec import DataSpec

    (tmp_path / "d.jsonl").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))  # ASCII, but for the latin-1 case
    with pytest.raises(UserError) as e:
        first_documents(str(tmp_path / "d.jsonl"), DataSpec(**{"source": "d.jsonl", "text": "text", **data}), "data.source")
    assert e.value.field == field, e.value
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_token_ids_beyond_the_tokenizer(tmp_path):
    from kd_ray.data.text import refuse_unknown_tokens

    docs = [(0, np.array([1, 2]), np.ones(2, bool)), (7, np.array([3, 50]), np.ones(2, bool))]
    with pytest.raises(UserError) as e:
        refuse_unknown_tokens(docs, 50)
    assert e.value.field == "data.tokens" and "document 7 holds token id 50" in e.value.message and "0..49" in e.value.message
    refuse_unknown_tokens(docs[:1], 50)



# ------------------------------------------------------------------------------------------------
# Bad inputs II: the CLI's own arguments and environment


@pytest.fixture
def runs_to_report(tmp_path):
    """Two runs with a metrics.jsonl each (what `kd-ray report` reads), a file and a directory."""
    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.jsonl").write_text('{"kind": "start", "step": 0}\n')
    (tmp_path / "runs" / "empty").mkdir()
    (tmp_path / "runs" / "odd" / "metrics.jsonl").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("a regular file\n")
    (tmp_path / "pictures").mkdir()
    return tmp_path


REPORTS = [
    ("out-under-a-regular-file", ["--out", "{d}/notes.txt/compare.png"], "--out", ["notes.txt is a file", "choose another path"]),
    ("out-two-below-a-file", ["--out", "{d}/notes.txt/x/compare.png"], "--out", ["notes.txt is a file"]),
    ("out-an-existing-directory", ["--out", "{d}/pictures"], "--out", ["pictures is a directory", "pictures/compare.png"]),
    ("out-a-bucket-without-name", ["--out", "s3:///compare.png"], "--out", ["names no bucket"]),
    ("run-dir-without-metrics", [], "report", ["has no metrics.jsonl"]),
    ("metrics-a-directory", [], "report", ["has no metrics.jsonl"]),
    ("run-without-training-records", [], "report", ["has no training records", "train.log_every"]),
    ("run-dir-bucket-without-name", [], "report", ["s3:///runs/a names no bucket"]),
    ("run-dir-file-uri-relative", [], "report", ["file://runs/a is not a local path"]),
]
REPORTED = {"run-dir-without-metrics": ["a", "empty"], "metrics-a-directory": ["odd"], "run-without-training-records": ["a", "b"],
            "run-dir-bucket-without-name": ["s3:///runs/a"], "run-dir-file-uri-relative": ["file://runs/a"]}


@pytest.mark.parametrize("extra, field, needles", [c[1:] for c in REPORTS], ids=[c[0] for c in REPORTS])
def test_report_mistakes_are_one_line_and_write_nothing(runs_to_report, capsys, request, extra, field, needles):
    d = runs_to_report
    runs = REPORTED.get(request.node.callspec.id, ["a", "b"])
    before = _tree(d)
    run_dirs = [r if "://" in r else str(d / "runs" / r) for r in runs]
    _refused(capsys, ["report", *run_dirs, *[e.replace("{d}", str(d)) for e in extra]], field, needles)
    assert _tree(d) == before, "a file was written (a stray temporary file?)"


def _no_ray_init(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called with an address that does not answer"))


ADDRESSES = [
    ("closed-port", "127.0.0.1:{port}", ["nothing answers at 127.0.0.1:", "connection refused", "ray start --head"]),
    ("client-closed-port", "ray://127.0.0.1:{port}", ["nothing answers at ray://127.0.0.1:"]),
    ("unknown-host", "no-such-host.invalid:6379", ["nothing answers at no-such-host.invalid:6379", "unset RAY_ADDRESS"]),
    ("port-not-a-number", "127.0.0.1:abc", ["is not HOST:PORT"]),
    ("dashboard-url", "http://127.0.0.1:8265", ["http:// is for `ray job submit --address`"]),
]


@pytest.mark.parametrize("address, needles", [c[1:] for c in ADDRESSES], ids=[c[0] for c in ADDRESSES])
def test_an_unreachable_ray_address_is_one_line_at_once(world, capsys, monkeypatch, address, needles):
    """RAY_ADDRESS is tried with a deadline before Ray is asked to join it (ray.init used to retry
    for a quarter of an hour), and the finished run beside the job stays where it was."""
    import time

    from conftest import free_port

    import kd_ray.cluster
    import kd_ray.job

    monkeypatch.setattr(kd_ray.job, "ensure_ray", kd_ray.cluster.ensure_ray)
    monkeypatch.setattr(kd_ray.cluster.ray, "is_initialized", lambda: False)
    _no_ray_init(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", address.replace("{port}", str(free_port())))
    started = time.time()
    _refused(capsys, ["run", str(world / "job.yaml")], "RAY_ADDRESS", needles, world)
    assert time.time() - started < kd_ray.cluster.CONNECT_SECONDS + 30


def test_an_unwritable_kd_ray_home_is_named_before_a_gguf_is_converted(lm, capsys, monkeypatch):
    """A .gguf teacher is converted once into KD_RAY_HOME: a home that cannot be written is said
    at once, naming KD_RAY_HOME (it used to be blamed on data.tokenizer after the conversion)."""
    import copy

    from conftest import write_job as write_yaml
    from test_lm import _lm_job

    (lm["tmp"] / "a_file").write_text("not a directory\n")
    monkeypatch.setenv("KD_RAY_HOME", str(lm["tmp"] / "a_file" / "home"))
    job = copy.deepcopy(_lm_job(lm))
    job["teacher"]["model"] = str(lm["tmp"] / "bad.gguf")
    _refused(capsys, ["validate", write_yaml(lm["tmp"] / "job.yaml", job)], "KD_RAY_HOME", ["a_file is a file", "set KD_RAY_HOME"])


def test_a_storage_endpoint_that_never_answers_is_one_line_within_the_deadline(tmp_path):
    """An S3 endpoint that takes the connection and never answers (a proxy, a firewall): the
    run's storage is refused within the deadline, naming run.storage_path, and the process ends
    then (pyarrow's client, still retrying, is not waited for)."""
    import socket
    import threading
    import time

    from conftest import run_cli, write_job

    from kd_ray.core.storage import CONTACT_SECONDS

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    port = server.getsockname()[1]
    job = write_job(tmp_path / "job.yaml", {**BASE, "run": {"name": "t", "storage_path": f"s3://b/runs?endpoint_override=127.0.0.1:{port}&scheme=http"}})
    started = time.time()
    done = run_cli(["validate", job], timeout=CONTACT_SECONDS + 120)
    took = time.time() - started
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith("kd-ray: error: run.storage_path: s3://b/runs: the storage endpoint did not answer within"), lines[0]
    assert took < CONTACT_SECONDS + 45, took  # the deadline, and the interpreter's start; not the client's retries


WORKER_HOOKS_PY = """\
from torch import nn

from kd_ray.callbacks import Callback
from kd_ray.core.errors import UserError


class NeedsWorkers(Callback):
    def __init__(self, at_least: int):
        self.at_least = at_least

    def on_start(self, info):  # what only a worker knows: the world size it got
        if info.world_size < self.at_least:
            raise UserError("callbacks.0.kwargs", f"at_least: {self.at_least} needs that many workers, the run has "
                            f"{info.world_size}; lower it, or raise train.num_workers")


class RefuseShards(Callback):
    def __init__(self, most: int):
        self.most, self.written = most, 0

    def on_shard_written(self, shard):  # what only a capture actor knows: the shards it wrote
        self.written += 1
        if self.written > self.most:
            raise UserError("callbacks.0.kwargs", f"most: {self.most} shards per actor, and this one wrote more; raise it")


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.flatten(1)).detach()  # a student that cannot learn: its first backward fails


def detached():
    return Detached()
"""


def test_a_finished_run_stays_until_the_new_run_has_taken_its_first_step(ray_cluster, tmp_path, capsys):
    """Mistakes only a worker meets, after every check on the driver has passed: a callback that
    raises the user's error in on_start (one line, exit 2, naming its field, not Ray's traceback)
    and a student whose first backward fails (exit 1). Each time the finished run is where it was,
    byte for byte, with no NAME.<timestamp>/ beside it; a run that works then moves it aside."""
    from conftest import digits_job
    from conftest import write_job as write_yaml

    (tmp_path / "worker_hooks.py").write_text(WORKER_HOOKS_PY)
    run = tmp_path / "runs" / "t"
    (run / "checkpoint_000000").mkdir(parents=True)
    (run / "checkpoint_000000" / "resume.json").write_text('{"step": 22}')
    (run / "summary.json").write_text(json.dumps({"status": "finished", "steps": 22}))
    (run / "student.safetensors").write_bytes(b"\x00student weights\x01")
    job = digits_job(tmp_path, "t")
    job["run"]["max_failures"] = 0
    job["train"].update(num_workers=1, max_steps=2, global_batch_size=32, micro_batch_size=16)
    job["callbacks"] = [{"callable": "worker_hooks:NeedsWorkers", "kwargs": {"at_least": 2}}]
    path = write_yaml(tmp_path / "job.yaml", job)
    _refused(capsys, ["run", path], "callbacks.0.kwargs", ["at_least: 2 needs that many workers, the run has 1"], tmp_path)

    before = _tree(tmp_path / "runs")
    rc = main(["run", path, "callbacks=[]", "student.model=worker_hooks:detached", "student.kwargs={}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.splitlines()[-1].startswith("kd-ray: run failed: ") and "Traceback" not in err, err[-3000:]
    assert _tree(tmp_path / "runs") == before and os.listdir(tmp_path / "runs") == ["t"]

    assert main(["run", path, "callbacks=[]"]) == 0
    out = capsys.readouterr().out
    moved = [n for n in os.listdir(tmp_path / "runs") if n.startswith("t.")]
    assert len(moved) == 1 and f"previous run moved to {tmp_path / 'runs' / moved[0]}" in out, out[-3000:]
    assert (tmp_path / "runs" / moved[0] / "student.safetensors").read_bytes() == b"\x00student weights\x01"


CLI_LINES = [
    ("override-after-a-flag", ["run", "{job}", "--fresh", "train.epochs=true"], "train.epochs", ["must be a number, not true"]),
    ("override-after-verbose", ["run", "{job}", "--verbose", "logging.report=\"no\""], "logging.report", ["must be true or false"]),
    ("stray-word-after-a-flag", ["run", "{job}", "--fresh", "epochs"], "unrecognized arguments", ["epochs", "kd-ray --help"]),
    ("unknown-flag", ["validate", "{job}", "--dry-run"], "unrecognized arguments", ["--dry-run"]),
    ("cache-callback-kwargs", ["cache", "{job}", *CACHED, "teacher.cache.path=cache2", "callbacks=[{callable: hooks:Every, kwargs: {n: 1}}]"],
     "callbacks.0.kwargs", ["does not accept"]),
    ("eval-beta-unused", ["eval", "{job}", "distill.beta=0.9"], "distill.beta", ["only applies to loss: jsd"]),
    ("eval-weights-bucket-without-name", ["eval", "{job}", "--weights", "s3:///w.safetensors"], "--weights", ["names no bucket"]),
    ("eval-weights-file-uri-relative", ["eval", "{job}", "--weights", "file://w.safetensors"], "--weights", ["is not a local path"]),
]


@pytest.mark.parametrize("argv, field, needles", [c[1:] for c in CLI_LINES], ids=[c[0] for c in CLI_LINES])
def test_command_line_mistakes_are_one_line(world, capsys, argv, field, needles):
    argv = [a.replace("{job}", str(world / "job.yaml")) for a in argv]
    if field == "unrecognized arguments":  # argparse's own exit, with the same one line
        before = _tree(world / "runs")
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"kd-ray: error: {field}: "), err
        assert all(n in err for n in needles) and _tree(world / "runs") == before, err
        return
    _refused(capsys, argv, field, needles, world)


def test_lm_cache_refuses_a_teacher_of_other_weights_before_ray(lm, capsys):
    """`kd-ray cache` with a teacher given another model's weights: one line naming
    teacher.weights before any actor loads it (it used to be ~95 lines of Ray's traceback)."""
    import copy

    from conftest import write_job as write_yaml
    from test_lm import _lm_job

    job = copy.deepcopy(_lm_job(lm))
    job["teacher"].update(weights=str(lm["tmp"] / "other_lm.safetensors"), cache={"path": str(lm["tmp"] / "cache")})
    _refused(capsys, ["cache", write_yaml(lm["tmp"] / "job.yaml", job)], "teacher.weights", ["does not fit"])
    assert not os.path.exists(lm["tmp"] / "cache")


def test_warnings_go_to_stderr_and_progress_to_stdout(capsys):
    from kd_ray.run.console import format_event, say

    say(format_event({"kind": "warning", "message": "checkpoint_000002 cannot be used"}))
    say("kd-ray: run t -> runs/t")
    out, err = capsys.readouterr()
    assert err == "warning: checkpoint_000002 cannot be used\n" and out == "kd-ray: run t -> runs/t\n"


def test_a_mistake_raised_in_a_capture_actor_is_one_line(ray_cluster, teacher_weights, tmp_path):
    """`kd-ray cache`: a UserError raised in the teacher pool's actor (a callback's on_shard_written)
    reaches the console as its one line, not as Ray's traceback, and the cache beside the job is
    untouched."""
    from conftest import kd_job, run_cli
    from conftest import write_job as write_yaml

    (tmp_path / "worker_hooks.py").write_text(WORKER_HOOKS_PY)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text('{"kd_ray_cache": 1}')
    (tmp_path / "runs").mkdir()
    job = kd_job(tmp_path, "t", teacher_weights)
    job["teacher"].update(pool={"min_actors": 1, "max_actors": 1, "batch_size": 64}, cache={"path": str(tmp_path / "new_cache")})
    job["callbacks"] = [{"callable": "worker_hooks:RefuseShards", "kwargs": {"most": 0}}]
    before = _tree(tmp_path / "cache")
    # A process of its own, as a user runs it: what Ray and Ray Data print there is what they see.
    done = run_cli(["cache", write_yaml(tmp_path / "job.yaml", job)], ray_cluster)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("kd-ray: error: callbacks.0.kwargs: most: 0 shards per actor"), lines[0]
    assert _tree(tmp_path / "cache") == before


def test_a_run_moved_aside_comes_back_unless_the_new_one_took_a_step(tmp_path):
    """kd_ray.run.directory.Aside on its own: what the new run wrote before its first step is
    removed and the previous run put back, byte for byte; after a first step it stays aside."""
    from kd_ray.run.directory import Aside

    run = tmp_path / "runs" / "t"
    (run / "checkpoint_000000").mkdir(parents=True)
    (run / "summary.json").write_text('{"status": "finished"}')
    before = _tree(tmp_path / "runs")
    aside = Aside(str(run))
    assert os.listdir(tmp_path / "runs") == [os.path.basename(aside.archived)]
    (run / "tensorboard").mkdir(parents=True)  # what a new run writes as it starts
    (run / "metrics.jsonl").write_text('{"kind": "start"}\n')
    aside.settle()
    assert _tree(tmp_path / "runs") == before

    aside = Aside(str(run))
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train"}\n')
    assert aside.keep() == f"previous run moved to {aside.archived}"
    aside.settle()
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(["t", os.path.basename(aside.archived)])
    assert (tmp_path / "runs" / os.path.basename(aside.archived) / "summary.json").read_text() == '{"status": "finished"}'
