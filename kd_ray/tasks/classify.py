"""Classification: a row is (id, features x, label y); the teacher sends dense logits (or, from a
cache, a top-k per sample); the loss is per sample, over the global batch's samples."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from kd_ray import storage
from kd_ray.data import TEACHER, X, Y
from kd_ray.models import is_conv_net
from kd_ray.registry import build_model
from kd_ray.signals import as_tensor
from kd_ray.spec import JobSpec
from kd_ray.train import step
from kd_ray.train.checkpoint import STUDENT_WEIGHTS
from kd_ray.train.precision import autocast
from kd_ray.weights import load_into

LOGITS_DTYPES = {"float32": np.float32, "float16": np.float16}


class Classify:
    name = "classify"
    unit = "samples"
    fixed_count = True  # a micro-batch's loss units are its samples: known before it is read

    def __init__(self, spec: JobSpec):
        self.spec = spec

    # ---------------------------------------------------------------- rows

    def readers(self):
        """(train source, eval source or None: then the split is drawn from the train source)."""
        from kd_ray.data import sources

        data = self.spec.data
        eval_reader = sources.open_source(data.eval_source, data, "data.eval_source") if data.eval_source else None
        return sources.open_source(data.source, data), eval_reader

    def transform(self, train: bool) -> dict:
        """Deterministic preprocessing (train and eval), random augmentation (train only)."""
        p, a = self.spec.data.preprocess, self.spec.data.augment
        return {
            "preprocess": dict(scale=p.scale, mean=p.mean, std=p.std),
            "augment": dict(noise_std=a.noise_std, shift=a.shift, hflip=a.hflip) if train and a.active else None,
        }

    # ---------------------------------------------------------------- models

    def build_student(self, device: torch.device) -> torch.nn.Module:
        spec = self.spec
        # The same seed on every rank: FSDP2 does not broadcast rank 0's initial weights as DDP does.
        torch.manual_seed(spec.run.seed)
        student = build_model(spec.student.model, spec.student.kwargs, spec.job_dir)
        if spec.student.weights:
            load_into(student, spec.student.weights)
        student.to(device)
        if device.type == "cuda" and is_conv_net(student):
            student.to(memory_format=torch.channels_last)
        return student

    def fsdp_units(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Each top-level child that trains, then the root."""
        return [c for c in model.children() if any(p.requires_grad for p in c.parameters())]

    @functools.lru_cache(maxsize=1)
    def _conv_net(self, model: torch.nn.Module) -> bool:
        return is_conv_net(model)

    def load_teacher(self, device: torch.device) -> torch.nn.Module:
        t = self.spec.teacher
        model = build_model(t.model, t.kwargs, self.spec.job_dir)
        load_into(model, t.weights)
        return model

    def teacher_columns(self, model: torch.nn.Module, batch: dict, device: torch.device, precision: str) -> dict:
        """Dense logits of the batch, in teacher.logits_dtype (what travels to the trainers)."""
        x = as_tensor(batch[X]).to(device, non_blocking=True)
        if self._conv_net(model) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(precision, device):
            logits = model(x)
        return {TEACHER: logits.float().cpu().numpy().astype(LOGITS_DTYPES[self.spec.teacher.logits_dtype], copy=False)}

    # ---------------------------------------------------------------- training

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(len(batch[Y]), dtype=torch.float64)

    def micro_step(self, model, batch: dict, denominator, device: torch.device, scaler, sync: bool):
        d, t = self.spec.distill, self.spec.train
        return step.micro_step(model, batch, temperature=d.temperature, alpha=d.alpha, denominator=denominator,
                               precision=t.precision, device=device, scaler=scaler, sync=sync)

    def eval_sums(self, model, batches, device: torch.device) -> torch.Tensor:
        return step.student_eval_sums(model, batches, self.spec.train.precision, device)

    def teacher_eval_sums(self, batches, device: torch.device) -> torch.Tensor:
        return step.teacher_eval_sums(batches, device)

    def teacher_figures(self, sums: list[float]) -> dict:
        loss, correct, count = sums
        return {"accuracy": correct / max(count, 1), "loss": None if math.isnan(loss) else loss / max(count, 1)}

    def figures(self, loss: float, correct: float, count: float) -> dict:
        """An evaluation's figures from its sums (kd_ray.train.step.score_sums)."""
        return {"eval_loss": loss / max(count, 1), "eval_accuracy": correct / max(count, 1), "eval_samples": int(count)}

    def run_figures(self, trains: list[dict]) -> dict:
        return {}

    def export(self, directory: str, state_dict: dict) -> None:
        """The checkpoint's student.safetensors + student.json are the export already."""

    def exported(self, run_dir: str) -> str:
        return storage.join(run_dir, STUDENT_WEIGHTS)

    def check_exported(self, path: str, field: str) -> None:
        """On the driver, before Ray: a weights file that fits the student (names and shapes, the
        model built on the meta device)."""
        from kd_ray.checks import check_weights_file

        with torch.device("meta"):
            model = build_model(self.spec.student.model, self.spec.student.kwargs, self.spec.job_dir)
        check_weights_file(path, field, model, self.spec.student.model, "run the job first (kd-ray run) or pass --weights PATH")

    def load_exported(self, path: str) -> torch.nn.Module:
        model = build_model(self.spec.student.model, self.spec.student.kwargs, self.spec.job_dir)
        load_into(model, path)
        return model
