"""Job-spec validation through the real CLI entry point (`kd-ray validate`), without Ray.

Every user mistake must exit 2 with exactly one stderr line `kd-ray: error: FIELD: message`
that names the dotted job-file field, and never a traceback.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kd_ray.checks import load_job
from kd_ray.cli import main
from kd_ray.models import convnet, mlp, weights

BASE = {
    "run": {"name": "t", "storage_path": "runs"},
    "data": {"source": "builtin:digits", "shape": [1, 8, 8]},
    "student": {"model": "mlp", "kwargs": {"in_features": 64, "num_classes": 10, "hidden": 8, "depth": 1}},
    "train": {"epochs": 1, "global_batch_size": 64, "micro_batch_size": 32, "num_workers": 2},
}
TEACHER_KWARGS = {"in_channels": 1, "num_classes": 10, "width": 4, "blocks": 1}
TEACHER = [
    "teacher.model=convnet",
    "teacher.kwargs={in_channels: 1, num_classes: 10, width: 4, blocks: 1}",
]
WITH_WEIGHTS = TEACHER + ["teacher.weights=teacher.safetensors"]

MODELS_PY = """\
from kd_ray.models import mlp


def net(**kwargs):
    return mlp(**kwargs)


def not_a_module(**kwargs):
    return 3
"""


def _copy(d: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(d))


def write_job(directory, raw: dict, name: str = "job.yaml") -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


@pytest.fixture(autouse=True)
def _isolated_imports(monkeypatch):
    """A job directory is put on sys.path and its `models` module cached by the registry: undo
    both after every test so each tmp_path's models.py is the one imported."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("models", "broken_models", "raising_models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield
    for name in ("models", "broken_models", "raising_models"):
        sys.modules.pop(name, None)


@pytest.fixture
def job_dir(tmp_path):
    """A job directory holding the base job file and the files the bad cases refer to."""
    weights.save(convnet(**TEACHER_KWARGS).state_dict(), str(tmp_path / "teacher.safetensors"))
    # A state dict of a different model: does not fit the convnet teacher.
    weights.save(mlp(in_features=64, num_classes=10, hidden=8, depth=1).state_dict(), str(tmp_path / "other.safetensors"))
    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "broken_models.py").write_text("def net(:\n    pass\n")
    (tmp_path / "raising_models.py").write_text("raise RuntimeError('first line\\nsecond line')\n")
    (tmp_path / "bad.yaml").write_text("run:\n  name: t\n  storage_path: [runs\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", feats=rng.random((20, 64), dtype=np.float32), y=rng.integers(0, 10, 20))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64))
    pq.write_table(pa.table({"x": pa.array([], pa.list_(pa.float32())), "y": pa.array([], pa.int64())}), tmp_path / "empty.parquet")
    write_job(tmp_path, BASE)
    return tmp_path


def _without(section: str, key: str | None = None):
    def edit(raw: dict) -> dict:
        if key is None:
            del raw[section]
        else:
            del raw[section][key]
        return raw

    return edit


# (id, edit of the base dict or None, overrides, expected field, substrings the message must hold)
BAD = [
    ("unknown-top-level-key", None, ["traing.epochs=1"], "traing", ["unknown key", "did you mean 'train'"]),
    ("unknown-nested-key", None, ["train.epochz=1"], "train.epochz", ["did you mean 'epochs'"]),
    ("unknown-key-no-close-match", None, ["train.zzzzzz=1"], "train.zzzzzz", ["allowed keys here", "global_batch_size"]),
    ("wrong-type", None, ["train.epochs=abc"], "train.epochs", ["integer", "'abc'"]),
    ("wrong-type-list-item", None, ["data.shape=[1, a, 8]"], "data.shape.1", ["integer"]),
    ("section-not-a-mapping", None, ["train=3"], "train", ["dictionary"]),
    ("alpha-above-1", None, ["distill.alpha=1.5"], "distill.alpha", ["less than or equal to 1", "1.5"]),
    ("temperature-zero", None, ["distill.temperature=0"], "distill.temperature", ["greater than 0"]),
    ("eval-split-1", None, ["data.eval_split=1.0"], "data.eval_split", ["less than 1"]),
    ("epochs-zero", None, ["train.epochs=0"], "train.epochs", ["greater than or equal to 1"]),
    ("bad-run-name", None, ["run.name=a b"], "run.name", ["pattern"]),
    ("missing-section", _without("student"), [], "student", ["is required"]),
    ("missing-field", _without("train", "global_batch_size"), [], "train.global_batch_size", ["is required"]),
    ("no-epochs-no-max-steps", _without("train", "epochs"), [], "train", ["epochs or max_steps"]),
    ("batch-not-divisible", None, ["train.global_batch_size=96"], "train.global_batch_size", ["not divisible", "64 or 128"]),
    ("micro-batch-not-dividing", None, ["train.micro_batch_size=24"], "train.global_batch_size", ["24 x 2 = 48", "48 or 96"]),
    ("elastic-range-reversed", None, ["train.num_workers=[3, 1]"], "train", ["[min, max]", "1 <= min <= max"]),
    ("elastic-range-uneven", None, ["train.num_workers=[1, 4]"], "train.num_workers", ["world size(s) 3, 4 in [1, 4]", "divides 2"]),
    ("checkpoint-minutes-zero", None, ["checkpoint.every_minutes=0"], "checkpoint.every_minutes", ["greater than 0"]),
    ("max-failures-below-minus-one", None, ["run.max_failures=-2"], "run.max_failures", ["greater than or equal to -1"]),
    ("strategy-literal", None, ["train.strategy=zero"], "train.strategy", ["'ddp' or 'fsdp'", "'zero'"]),
    ("precision-literal", None, ["train.precision=fp8"], "train.precision", ["'fp32', 'bf16' or 'fp16'", "'fp8'"]),
    ("fp16-on-cpu", None, ["train.precision=fp16", "train.use_gpu=false"], "train.precision", ["fp16 needs CUDA"]),
    ("teacher-fp16-no-gpu", None, WITH_WEIGHTS + ["teacher.precision=fp16"], "teacher.precision", ["fp16 needs CUDA", "gpus_per_actor"]),
    ("missing-data-file", None, ["data.source=/nonexistent.parquet"], "data.source", ["/nonexistent.parquet does not exist"]),
    ("missing-eval-file", None, ["data.eval_source=nope.npz"], "data.eval_source", ["nope.npz does not exist"]),
    ("empty-data-file", None, ["data.source=empty.npz"], "data.source", ["empty.npz holds no samples"]),
    ("empty-parquet", None, ["data.source=empty.parquet"], "data.source", ["empty.parquet holds no samples"]),
    ("empty-eval-file", None, ["data.eval_source=empty.npz"], "data.eval_source", ["empty.npz holds no samples"]),
    ("unknown-builtin-data", None, ["data.source=builtin:mnist"], "data.source", ["'mnist'", "builtin:digits"]),
    ("npz-missing-features-key", None, ["data.source=data.npz"], "data.features", ["'x' is not an array", "feats"]),
    ("shape-product", None, ["data.source=data.npz", "data.features=feats", "data.shape=[1, 8, 9]"], "data.shape", ["72", "64"]),
    ("unimportable-model", None, ["student.model=nosuchmod:net"], "student.model", ["cannot import module 'nosuchmod'"]),
    ("module-without-callable", None, ["student.model=models:nett"], "student.model", ["no callable 'nett'", "did you mean 'models:net'"]),
    ("model-module-syntax-error", None, ["student.model=broken_models:net"], "student.model", ["SyntaxError", "broken_models"]),
    ("model-module-raises", None, ["student.model=raising_models:net"], "student.model", ["RuntimeError", "first line second line"]),
    ("unknown-model-name", None, ["student.model=resnet19"], "student.model", ["unknown model 'resnet19'", "did you mean 'resnet18'"]),
    ("bad-model-kwargs", None, ["student.kwargs.bogus=1"], "student.model", ["bogus", "in_features"]),
    ("teacher-without-weights", None, TEACHER, "teacher.weights", ["needs trained weights"]),
    ("missing-teacher-weights", None, TEACHER + ["teacher.weights=nope.safetensors"], "teacher.weights", ["nope.safetensors does not exist"]),
    ("teacher-weights-do-not-fit", None, TEACHER + ["teacher.weights=other.safetensors"], "teacher.weights",
     ["other.safetensors does not fit convnet", "0.weight"]),
    ("weights-of-non-module-factory", None, ["student.model=models:not_a_module", "student.weights=teacher.safetensors"],
     "student.model", ["returned int, not a torch.nn.Module"]),
    ("pool-max-below-min", None, WITH_WEIGHTS + ["teacher.pool.min_actors=3", "teacher.pool.max_actors=2"], "teacher.pool",
     ["max_actors must be >= min_actors"]),
    ("teacher-without-model", None, ["teacher.pool.max_actors=2"], "teacher.model", ["is required"]),
    ("override-without-equals", None, ["train.epochs"], "override", ["not of the form section.key=value"]),
    ("override-into-scalar", None, ["train.epochs.x=1"], "train.epochs", ["is not a section"]),
    ("run-name-parent", None, ["run.name=.."], "run.name", ["directory of its own"]),
    # nobody answers on port 1: the mistake a wrong endpoint makes, found before anything starts
    ("remote-storage", None, ["run.storage_path=s3://bucket/runs?endpoint_override=127.0.0.1:1&scheme=http"], "run.storage_path",
     ["cannot use s3://bucket/runs: the storage endpoint does not answer", "endpoint_override"]),
    ("labels-beyond-student-outputs", None, ["student.kwargs.num_classes=5"], "student.kwargs", ["labels go up to 9", "give it 10 classes"]),
    ("num-classes-vs-student", None, ["data.num_classes=10", "student.kwargs.num_classes=12"], "student.kwargs", ["12 outputs", "num_classes is 10"]),
    ("student-cannot-take-shape", None, ["data.shape=[64]", "student.model=convnet", "student.kwargs={}"], "student.model",
     ["cannot take samples of shape [64]"]),
    ("preprocess-channels", None, ["data.preprocess.mean=[0.1, 0.2]"], "data.preprocess.mean", ["2 values", "1 values (one per channel)"]),
]


def _validate(capsys, path, overrides):
    rc = main(["validate", str(path), *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, field, needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    line = lines[0]
    assert line.startswith("kd-ray: error: "), line
    # The field comes first, right after the prefix: "kd-ray: error: train.epochs: ..."
    assert line.startswith(f"kd-ray: error: {field}: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"


def test_bad_cases_are_distinct():
    assert len({case[0] for case in BAD}) == len(BAD) >= 18
    overrides_only = [tuple(case[2]) for case in BAD if case[1] is None]
    assert len(set(overrides_only)) == len(overrides_only)


@pytest.mark.parametrize("edit, overrides, field, needles", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_one_line_user_error(job_dir, capsys, edit, overrides, field, needles):
    path = write_job(job_dir, edit(_copy(BASE)), "edited.yaml") if edit else job_dir / "job.yaml"
    rc, _, err = _validate(capsys, path, overrides)
    _assert_one_line_error(rc, err, field, needles)


def test_invalid_yaml(job_dir, capsys):
    rc, _, err = _validate(capsys, job_dir / "bad.yaml", [])
    _assert_one_line_error(rc, err, "job file", ["bad.yaml is not valid YAML", "line"])


def test_missing_job_file(tmp_path, capsys):
    rc, _, err = _validate(capsys, tmp_path / "nope.yaml", [])
    _assert_one_line_error(rc, err, "job file", ["nope.yaml does not exist"])


@pytest.mark.parametrize("text", ["", "3\n", "- a\n- b\n"], ids=["empty", "scalar", "list"])
def test_job_file_not_a_mapping(tmp_path, capsys, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    rc, _, err = _validate(capsys, path, [])
    _assert_one_line_error(rc, err, "job file", ["must be a YAML mapping"])


# ---------------------------------------------------------------------------------------------
# Valid jobs


def test_valid_job(job_dir, capsys):
    rc, out, err = _validate(capsys, job_dir / "job.yaml", [])
    assert rc == 0, err
    assert err == ""
    assert "valid" in out


def test_valid_job_with_teacher(job_dir, capsys):
    rc, _, err = _validate(capsys, job_dir / "job.yaml", WITH_WEIGHTS)
    assert rc == 0, err


def test_overrides_change_values(job_dir):
    spec = load_job(
        str(job_dir / "job.yaml"),
        [
            "train.epochs=3",
            "train.max_steps=7",
            "distill.alpha=0.25",
            "train.optimizer.lr=0.01",
            "train.optimizer.betas=[0.8, 0.9]",
            "data.augment.noise_std=0.2",  # creates the data.augment section
            "data.preprocess.mean=[0.5]",
            "student.kwargs.hidden=4",
            "run.name=renamed",
            "train.compile=",  # an empty value is null
            *WITH_WEIGHTS,
            "teacher.pool.max_actors=2",
        ],
    )
    assert spec.train.epochs == 3 and spec.train.max_steps == 7
    assert spec.distill.alpha == 0.25
    assert spec.train.optimizer.lr == 0.01
    assert spec.train.optimizer.betas == (0.8, 0.9)
    assert spec.data.augment.noise_std == 0.2 and spec.data.augment.active
    assert spec.data.augment.shift == 0 and spec.data.augment.hflip is False
    assert spec.data.preprocess.mean == [0.5]
    assert spec.student.kwargs == {"in_features": 64, "num_classes": 10, "hidden": 4, "depth": 1}
    assert spec.run.name == "renamed"
    assert spec.train.compile is None
    assert spec.teacher is not None and spec.teacher.model == "convnet"
    assert spec.teacher.kwargs == TEACHER_KWARGS
    assert spec.teacher.pool.max_actors == 2 and spec.teacher.pool.min_actors == 1


def test_overrides_do_not_touch_the_file(job_dir):
    path = job_dir / "job.yaml"
    before = path.read_text()
    load_job(str(path), ["train.epochs=5"])
    assert path.read_text() == before
    assert load_job(str(path)).train.epochs == 1


def test_relative_paths_resolve_against_the_job_file(tmp_path, monkeypatch):
    job_dir = tmp_path / "project" / "jobs"
    (job_dir / "data").mkdir(parents=True)
    (job_dir / "weights").mkdir()
    rng = np.random.default_rng(0)
    np.savez(job_dir / "data" / "d.npz", x=rng.random((20, 64), dtype=np.float32), y=rng.integers(0, 10, 20))
    weights.save(convnet(**TEACHER_KWARGS).state_dict(), str(job_dir / "weights" / "t.safetensors"))
    raw = _copy(BASE)
    raw["run"]["storage_path"] = "../runs"
    raw["data"]["source"] = "data/d.npz"
    raw["train"].update(global_batch_size=8, micro_batch_size=4)  # 20 samples: one batch of 8 fits
    raw["teacher"] = {"model": "convnet", "kwargs": TEACHER_KWARGS, "weights": "weights/t.safetensors"}
    path = write_job(job_dir, raw)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing the job names exists relative to the cwd
    spec = load_job(os.path.relpath(path, elsewhere))
    assert spec.job_dir == str(job_dir)
    assert spec.run.storage_path == str(tmp_path / "project" / "runs")
    assert spec.data.source == str(job_dir / "data" / "d.npz")
    assert spec.teacher.weights == str(job_dir / "weights" / "t.safetensors")
    assert spec.run_dir == str(tmp_path / "project" / "runs" / "t")
    # Absolute paths and built-in sources are left alone.
    spec = load_job(str(path), [f"run.storage_path={tmp_path}/abs", "data.source=builtin:digits"])
    assert spec.run.storage_path == f"{tmp_path}/abs"
    assert spec.data.source == "builtin:digits"


def test_relative_paths_through_the_cli_from_another_cwd(job_dir, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    rc, _, err = _validate(capsys, job_dir / "job.yaml", WITH_WEIGHTS + ["data.source=data.npz", "data.features=feats",
                                                                     "train.global_batch_size=8", "train.micro_batch_size=4"])
    assert rc == 0, err


def test_models_py_next_to_the_job_file(job_dir, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    rc, _, err = _validate(capsys, job_dir / "job.yaml", ["student.model=models:net"])
    assert rc == 0, err
    spec = load_job(str(job_dir / "job.yaml"), ["student.model=models:net"])
    assert spec.student.model == "models:net"

    from kd_ray.models.registry import build_model

    model = build_model(spec.student.model, spec.student.kwargs, spec.job_dir)
    assert sys.modules["models"].__file__ == str(job_dir / "models.py")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in mlp(**spec.student.kwargs).parameters())
