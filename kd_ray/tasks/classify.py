"""Classification: a row is (id, features x, label y); the teacher sends dense logits (or, from a
cache, a top-k per sample); the loss is per sample, over the global batch's samples."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from kd_ray.core import storage
from kd_ray.core.columns import TEACHER, X, Y
from kd_ray.data import sources
from kd_ray.losses import LossTerms, TopK, distill_loss
from kd_ray.models import is_conv_net
from kd_ray.models.precision import autocast
from kd_ray.models.registry import build_model
from kd_ray.models.weights import STUDENT_WEIGHTS, check_weights_file, load_into
from kd_ray.spec import JobSpec
from kd_ray.tasks.base import TaskHandle, fmt_score
from kd_ray.tasks.classify_checks import check_classifier
from kd_ray.teacher_signal import as_tensor, teacher_output

LOGITS_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def micro_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float,
    alpha: float,
    denominator: float,
    precision: str,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
) -> LossTerms:
    """Forward under autocast -> fp32 loss scaled for accumulation -> (scaled) backward."""
    with autocast(precision, device):
        logits = model(batch[X])
    teacher = teacher_output(batch, temperature)
    terms = distill_loss(logits, teacher, batch[Y], temperature=temperature, alpha=alpha, denominator=denominator)
    (scaler.scale(terms.loss) if scaler else terms.loss).backward()
    return terms


def score_sums(batches, logits_of, device: torch.device) -> torch.Tensor:
    """[cross-entropy sum, correct, count] over some batches; sums, so ranks can add them.

    `logits_of(batch)` gives the logits to score: the student's forward, or the teacher's
    outputs already in each batch. A top-k scores its top-1 exactly, but its cross-entropy sum is
    NaN: it needs the probability of labels outside the top k, which a top-k does not hold.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        logits = logits_of(batch)
        count = torch.tensor(len(batch[Y]), device=device, dtype=torch.float64)
        if isinstance(logits, TopK):
            correct = (logits.indices[:, 0].long() == batch[Y]).sum().double()
            sums += torch.stack([torch.tensor(float("nan"), dtype=torch.float64, device=device), correct, count])
            continue
        terms = distill_loss(logits, None, batch[Y], temperature=1.0, alpha=0.0, denominator=1.0)
        sums += torch.stack([terms.ce_sum.double(), terms.correct.double(), count])
    return sums


@torch.no_grad()
def student_eval_sums(model: nn.Module, batches, precision: str, device: torch.device) -> torch.Tensor:
    model.eval()
    try:
        with autocast(precision, device):
            return score_sums(batches, lambda b: model(b[X]), device)
    finally:
        model.train()


def teacher_eval_sums(batches, device: torch.device) -> torch.Tensor:
    return score_sums(batches, lambda b: teacher_output(b, temperature=1.0), device)  # a top-k: only its top-1 is scored


class Classify:
    """The Task (kd_ray.tasks.base) of a classifier."""

    name = "classify"
    unit = "samples"
    fixed_count = True  # a micro-batch's loss units are its samples: known before it is read
    prepares = False  # parquet row groups and arrays in memory are read as they are
    SCORES = (("accuracy", None, True), ("loss", None, False))

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @property
    def handle(self) -> TaskHandle:
        return TaskHandle(self)

    def check(self) -> None:
        """The job's data, models, weights and cache block, before Ray starts (UserError)."""
        check_classifier(self.spec)

    # ---------------------------------------------------------------- rows

    def readers(self):
        """(train source, eval source or None: then the split is drawn from the train source)."""
        data = self.spec.data
        eval_reader = sources.open_source(data.eval_source, data, "data.eval_source") if data.eval_source else None
        return sources.open_source(data.source, data), eval_reader

    def prepare(self, echo) -> str:
        raise NotImplementedError("a classifier's sources are read as they are (prepares = False)")

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

    def teacher_tensors(self, model: torch.nn.Module, batch: dict, device: torch.device, precision: str,
                        for_loss: bool = False) -> dict:
        """Dense logits of the batch, on `device`, in teacher.logits_dtype (what the pool sends),
        for the loss and the scores alike."""
        x = as_tensor(batch[X]).to(device, non_blocking=True)
        if self._conv_net(model) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(precision, device):
            logits = model(x)
        return {TEACHER: logits.float().to(LOGITS_DTYPES[self.spec.teacher.logits_dtype])}

    # ---------------------------------------------------------------- training

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(len(batch[Y]), dtype=torch.float64)

    def micro_step(self, model, batch: dict, denominator, device: torch.device, scaler) -> LossTerms:
        d, t = self.spec.distill, self.spec.train
        return micro_step(model, batch, temperature=d.temperature, alpha=d.alpha, denominator=denominator,
                          precision=t.precision, device=device, scaler=scaler)

    def eval_sums(self, model, batches, device: torch.device) -> torch.Tensor:
        return student_eval_sums(model, batches, self.spec.train.precision, device)

    def teacher_eval_sums(self, batches, device: torch.device) -> torch.Tensor:
        return teacher_eval_sums(batches, device)

    def teacher_figures(self, sums: list[float]) -> dict:
        loss, correct, count = sums
        return {"accuracy": correct / max(count, 1), "loss": None if math.isnan(loss) else loss / max(count, 1)}

    def teacher_line(self, scores: dict) -> str:
        return f"acc {scores['accuracy']:.4f} loss {fmt_score(scores['loss'])}"

    def figures(self, sums: list[float]) -> dict:
        """An evaluation's figures from its sums (kd_ray.train.step.score_sums)."""
        loss, correct, count = sums
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
        with torch.device("meta"):
            model = build_model(self.spec.student.model, self.spec.student.kwargs, self.spec.job_dir)
        check_weights_file(path, field, model, self.spec.student.model, "run the job first (kd-ray run) or pass --weights PATH")

    def load_exported(self, path: str) -> torch.nn.Module:
        model = build_model(self.spec.student.model, self.spec.student.kwargs, self.spec.job_dir)
        load_into(model, path)
        return model
