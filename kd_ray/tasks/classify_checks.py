"""A classifier job's own checks, before Ray starts: its data source (shape, labels, split), its
models (resolved, kwargs bound, one forward of 2 samples for the number of classes), their
weights (names and shapes against the model built on the meta device) and its cache block."""

from __future__ import annotations

import math

from kd_ray.core.errors import UserError, clip, shown
from kd_ray.core.imports import ModelNameError, check_kwargs
from kd_ray.data.sources import check_source
from kd_ray.models.registry import resolve
from kd_ray.models.weights import check_weights_file
from kd_ray.spec import LM_COLUMN_FIELDS, JobSpec, ModelSpec
from kd_ray.tasks.cache_checks import (
    check_cache_path,
    check_cache_temperatures,
    need_cache_block,
    refuse_augmentation,
)


def check_classifier(spec: JobSpec) -> None:
    for name in (*LM_COLUMN_FIELDS, "tokenizer", "prepared"):
        if getattr(spec.data, name) is not None:
            raise UserError(f"data.{name}", "only applies to task: causal_lm; remove it, or set task: causal_lm")
    if spec.data.chat_template:
        raise UserError("data.chat_template", "only applies to task: causal_lm; remove it, or set task: causal_lm")
    for field in ("source", "eval_source"):
        if isinstance(getattr(spec.data, field), list):
            raise UserError(f"data.{field}", "a list of files is read by task: causal_lm; for a classifier give one parquet file, a "
                            "directory of them, or a .npy/.npz file")
    if spec.onpolicy is not None:
        raise UserError("onpolicy", "on-policy distillation is for task: causal_lm (the student generates text); remove it")
    if spec.distill.divergence != "forward":
        raise UserError("distill.loss", f"{spec.distill.loss} is for task: causal_lm; a classifier distills with hinton (forward KL)")
    for name in ("top_k", "chunk_tokens"):  # per-token fields: a classifier's teacher sends a row per sample
        if name in spec.distill.model_fields_set:
            raise UserError(f"distill.{name}", "only applies to task: causal_lm; remove it, or set task: causal_lm")
    facts = check_source(spec.data, spec.run.seed)
    sample_shape, max_label = facts.sample_shape, facts.max_label
    _check_training_rows(spec, facts.train_rows, facts.source_rows)
    if spec.teacher is not None:
        if not spec.teacher.weights:
            raise UserError("teacher.weights", "a teacher needs trained weights (a .safetensors or .pt file); train one with a job that has no teacher section")
        if spec.teacher.cached:
            need_cache_block(spec)
            refuse_augmentation(spec)
    p = spec.data.preprocess
    for name, value in (("mean", p.mean), ("std", p.std)):
        if isinstance(value, list) and sample_shape is not None and (len(sample_shape) < 2 or len(value) != sample_shape[0]):
            channels = sample_shape[0] if len(sample_shape) >= 2 else None
            fix = f"give {channels} values (one per channel) or a single number" if channels else "give a single number (samples have no channel axis)"
            raise UserError(f"data.preprocess.{name}", f"{len(value)} values for samples of shape {list(sample_shape)}; {fix}")
    outputs = {}
    for section_name in ("student", "teacher"):
        section = getattr(spec, section_name)
        if section is not None:
            outputs[section_name] = check_model(section, section_name, spec.job_dir, sample_shape)
    classes = spec.data.num_classes
    if classes is None and outputs.get("student") is not None:
        # The bound every label is checked against as a parquet source is read (the values are not
        # read here): the student's outputs, where the job does not say data.num_classes.
        spec.data.num_classes = outputs["student"]
    if max_label is not None and outputs.get("student") is not None and max_label >= outputs["student"]:
        raise UserError("student.kwargs", f"the labels go up to {max_label} but {spec.student.model} gives {outputs['student']} outputs per sample; give it {max_label + 1} classes")
    if classes and outputs.get("student") not in (None, classes):
        raise UserError("student.kwargs", f"{spec.student.model} gives {outputs['student']} outputs per sample but data.num_classes is {classes}; set its number of classes to {classes}")
    if None not in (outputs.get("student"), outputs.get("teacher")) and outputs["student"] != outputs["teacher"]:
        raise UserError("teacher.kwargs", f"the teacher gives {outputs['teacher']} outputs per sample and the student {outputs['student']}; distillation needs the same classes in both")
    if spec.teacher is not None and spec.teacher.cache is not None:
        check_cache(spec, outputs.get("teacher"))


def _check_training_rows(spec: JobSpec, rows: int | None, source_rows: int | None) -> None:
    """A global batch the training split cannot fill, found before Ray starts (None: a remote
    source, counted only when the run opens it)."""
    G = spec.train.global_batch_size
    if rows is not None and rows == source_rows and not spec.data.eval_source:
        raise UserError("data.eval_split", f"{spec.data.eval_split} leaves none of the {source_rows} samples to evaluate on (a "
                        "sample's split is drawn by a hash of its id); raise it, or give data.eval_source")
    if rows is None or rows >= G:
        return
    if source_rows >= G:  # the split, not the data, leaves too few
        raise UserError("data.eval_split", f"{spec.data.eval_split} leaves {rows} of the {source_rows} samples to train on, fewer "
                        f"than one global batch ({G}); lower it, or give more data")
    raise UserError("train.global_batch_size", f"{G} is larger than the {rows} training samples; use at most {rows}")


# Below these sizes the shape probe runs for real on the CPU, in milliseconds: the meta device's
# first forward imports torch's decompositions, ~1.5 s of every small job's start.
PROBE_ON_CPU_PARAMS = 2_000_000
PROBE_ON_CPU_SAMPLE = 1 << 18


def check_model(section: ModelSpec, name: str, job_dir: str, sample_shape: tuple[int, ...] | None) -> int | None:
    """Resolve the model, check its kwargs and weights, and return its number of outputs for
    one sample (found by a forward of 2 samples: on the meta device, no memory and no compute,
    for a large model or sample), when the sample shape is known."""
    import torch

    try:
        factory = resolve(section.model, job_dir)
        check_kwargs(section.model, factory, section.kwargs)
    except ModelNameError as e:
        raise UserError(f"{name}.model", str(e)) from None
    try:
        with torch.device("meta"):
            model = factory(**section.kwargs)
    except (Exception, SystemExit) as e:  # a user's factory can fail in any way; report it on one line
        where = f"{name}.kwargs" if section.kwargs else f"{name}.model"  # given kwargs are the likelier mistake
        raise UserError(where, f"{section.model}({shown(section.kwargs)}) failed: {type(e).__name__}: {e}; fix {where}") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{name}.model", f"{section.model} returned {clip(type(model).__name__, 60)}, not a torch.nn.Module; "
                        "the factory must build and return the model")
    if section.weights:
        _check_weights(section, name, model)
    if sample_shape is None:
        return None
    try:
        params = sum(p.numel() for p in model.parameters())
        small = params <= PROBE_ON_CPU_PARAMS and math.prod(sample_shape) <= PROBE_ON_CPU_SAMPLE
        with torch.no_grad(), torch.device("cpu" if small else "meta"):
            out = (factory(**section.kwargs) if small else model)(torch.zeros((2, *sample_shape)))
    except (Exception, SystemExit) as e:  # any failure of the user's forward on this shape is the user's to fix
        raise UserError(f"{name}.model", f"{section.model} cannot take samples of shape {list(sample_shape)} ({type(e).__name__}: {e}); check data.shape and the model's kwargs") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise UserError(f"{name}.model", f"{section.model} must return logits of shape [batch, classes], got {getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[-1])


def check_cache(spec: JobSpec, classes: int | None) -> None:
    """The teacher.cache block: a format its options fit, and a top-k with room in the classes
    (when they are known: here from the sample shape, in `kd-ray cache` from the data)."""
    cache = spec.teacher.cache
    check_cache_path(cache.path)
    if cache.format == "full":
        for name in ("k", "temperatures"):
            if getattr(cache, name) is not None:
                raise UserError(f"teacher.cache.{name}", "only applies to format: topk; remove it, or set teacher.cache.format: topk")
        if cache.dtype == "bfloat16":
            raise UserError("teacher.cache.dtype", "full logits are stored as float32 or float16; bfloat16 is for format: topk")
        return
    if cache.k is None:
        raise UserError("teacher.cache.k", "format: topk needs k, the number of classes kept per sample (e.g. k: 10)")
    if classes is not None and cache.k > classes:
        raise UserError("teacher.cache.k", f"k={cache.k} but the teacher gives {classes} classes; use k <= {classes} (or format: full)")
    check_cache_temperatures(spec)


def _check_weights(section: ModelSpec, name: str, model) -> None:
    """Compare the file's tensor shapes with the model's, built on the meta device (no memory)."""
    path = section.weights
    check_weights_file(path, f"{name}.weights", model, section.model, "train it first (see README) or fix the path")
