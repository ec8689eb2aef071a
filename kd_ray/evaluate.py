"""`kd-ray eval`: score an exported student on a job's eval split, in a Ray task (the driver
holds no model)."""

from __future__ import annotations

import os

import ray
import torch

from kd_ray.cluster import ensure_ray, quiet_data
from kd_ray.data import pipeline
from kd_ray.errors import UserError
from kd_ray.registry import build_model, make_importable
from kd_ray.spec import JobSpec
from kd_ray.train.checkpoint import STUDENT_WEIGHTS
from kd_ray.train.step import student_eval_sums
from kd_ray.weights import WeightsError, load_into


@ray.remote(num_cpus=1)
def _score(spec: JobSpec, weights_path: str, dataset) -> dict:
    make_importable(spec.job_dir)
    model = build_model(spec.student.model, spec.student.kwargs, spec.job_dir)
    try:
        load_into(model, weights_path)
    except WeightsError as e:
        return {"error": str(e)}
    device = torch.device("cpu")
    batches = dataset.iter_torch_batches(batch_size=spec.eval.batch_size)
    loss, correct, count = student_eval_sums(model, batches, "fp32", device).tolist()
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "samples": int(count), "weights": weights_path}


def evaluate_student(spec: JobSpec, weights_path: str | None = None) -> dict:
    path = weights_path or os.path.join(spec.run_dir, STUDENT_WEIGHTS)
    if not os.path.isfile(path):
        raise UserError("--weights", f"{path} does not exist; run the job first (kd-ray run) or pass --weights PATH")
    ensure_ray(spec)
    quiet_data()
    metrics = ray.get(_score.remote(spec, os.path.abspath(path), pipeline.build_eval(spec)))
    if "error" in metrics:
        raise UserError("--weights", metrics["error"])
    return metrics
