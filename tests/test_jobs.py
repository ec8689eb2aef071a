"""The job files shipped in jobs/ are valid against the spec (with users' paths swapped in)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from conftest import ROOT
from kd_ray import weights
from kd_ray.models import convnet
from kd_ray.checks import load_job


def job(name: str) -> str:
    return os.path.join(ROOT, "jobs", name)


def test_quickstart_jobs_are_valid(tmp_path):
    teacher = load_job(job("quickstart_teacher.yaml"))
    assert teacher.teacher is None and teacher.data.source == "builtin:digits"
    kwargs = teacher.student.kwargs
    path = tmp_path / "teacher.safetensors"
    weights.save(convnet(**kwargs).state_dict(), str(path))
    spec = load_job(job("quickstart.yaml"), [f"teacher.weights={path}"])
    # the quickstart distills exactly the model the teacher job trains, into a much smaller one
    assert spec.teacher.model == teacher.student.model and spec.teacher.kwargs == kwargs
    from kd_ray.registry import build_model
    from kd_ray.models import num_parameters

    t = num_parameters(build_model(spec.teacher.model, spec.teacher.kwargs))
    s = num_parameters(build_model(spec.student.model, spec.student.kwargs))
    assert t >= 5 * s, (t, s)
    # both jobs write to the same runs/ directory at the project root
    assert spec.run.storage_path == os.path.join(ROOT, "runs")
    assert spec.teacher.weights == str(path)


def test_gpu_cluster_job_is_valid(tmp_path):
    """ResNet-50 -> ResNet-18, bf16, compile, DDP on GPUs; the paths point at a user's files."""
    data = tmp_path / "train"
    data.mkdir()
    n = 4
    images = np.zeros((n, 3 * 224 * 224), dtype=np.float32)
    table = pa.table({"image": pa.array(list(images), pa.list_(pa.float32(), 3 * 224 * 224)), "label": np.arange(n), "sample_id": np.arange(n)})
    pq.write_table(table, data / "part-0.parquet")
    # Shapes are what the spec checks; store the ResNet-50 tensors in fp16 to keep the file small.
    import torchvision

    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in torchvision.models.resnet50(num_classes=100).state_dict().items()}
    w = tmp_path / "resnet50.safetensors"
    weights.save(state, str(w))
    spec = load_job(job("resnet50_to_resnet18.yaml"), [
        f"data.source={data}", f"data.eval_source={data}", f"teacher.weights={w}", f"run.storage_path={tmp_path / 'runs'}",
    ])
    assert spec.train.use_gpu and spec.train.precision == "bf16" and spec.train.compile
    assert spec.teacher.precision == "bf16" and spec.teacher.pool.gpus_per_actor == 1
    assert spec.train.strategy in ("ddp", "fsdp")
    assert spec.teacher.model == "resnet50" and spec.student.model == "resnet18"
