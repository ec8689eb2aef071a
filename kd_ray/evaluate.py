"""`kd-ray eval`: score an exported student on a job's eval split, in a Ray task (the driver
holds no model): accuracy and loss for a classifier, perplexity for a language model."""

from __future__ import annotations

import os

import ray
import torch

from kd_ray.cluster import ensure_ray, quiet_data
from kd_ray.core import storage
from kd_ray.core.errors import UserError, as_users
from kd_ray.core.imports import make_importable
from kd_ray.data.chunks import Sources
from kd_ray.data.streams import build_eval
from kd_ray.spec import JobSpec
from kd_ray.tasks.build import task_for


@ray.remote(num_cpus=1)
def _score(spec: JobSpec, task, path: str, dataset) -> dict:
    make_importable(spec.job_dir)
    try:
        model = task.load_exported(path)
    except Exception as e:  # a file that does not fit the student is the user's to fix
        return {"error": f"{type(e).__name__}: {e}"}
    device = torch.device("cpu")
    batches = dataset.iter_torch_batches(batch_size=spec.eval.batch_size)
    figures = task.figures(task.eval_sums(model, batches, device).tolist())
    return {**{k.removeprefix("eval_"): v for k, v in figures.items()}, "weights": path}


def evaluate_student(spec: JobSpec, weights_path: str | None = None) -> dict:
    task = task_for(spec)
    path = weights_path or task.exported(spec.run_dir)
    if storage.is_remote(path):
        storage.check_reachable(path, "--weights")
    if not storage.exists(path):
        raise UserError("--weights", f"{path} does not exist; run the job first (kd-ray run) or pass --weights PATH")
    task.check_exported(path, "--weights")
    ensure_ray(spec)
    quiet_data()
    data = as_users(lambda: Sources(spec, task))  # a language model's documents are tokenized in Ray Data tasks
    metrics = ray.get(_score.remote(spec, task, path if storage.is_remote(path) else os.path.abspath(path), build_eval(spec, data)))
    if "error" in metrics:
        raise UserError("--weights", metrics["error"])
    return metrics
