"""Checks of a job that need its files: the data sources, the models and their weights, the cache
block. `load_job` and `validate` are the way in: a job file (or a dict) -> a JobSpec that has
passed every check that can run before Ray starts, or a UserError naming the field and the fix.

kd_ray.spec is the schema alone (types, ranges, overrides, paths); what needs to open a file or
import a model lives here, so the schema imports no reader and no model.
"""

from __future__ import annotations

import math
import os

import yaml

from kd_ray import storage, weights
from kd_ray.storage import need_file
from kd_ray.batching import check_world_sizes
from kd_ray.data.sources import check_source
from kd_ray.errors import SHOWN_CHARS, UserError, clip, shown
from kd_ray.losses import tail_column
from kd_ray.shards import MANIFEST
from kd_ray.registry import ModelNameError, check_kwargs, import_callable, resolve
from kd_ray.run.tracking import check_logging
from kd_ray.spec import JobSpec, ModelSpec, apply_override, cache_temperatures, load_yaml, parse, paths


def load_job(path: str, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override, validate and resolve a job file. Raises UserError on any mistake."""
    need_file(path, "job file", "pass the path of a YAML job file such as jobs/quickstart.yaml")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError("job file", f"{path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); save it as UTF-8") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError("job file", f"{path} is not valid YAML{where}: {clip(str(getattr(e, 'problem', e)), SHOWN_CHARS)}") from None
    except RecursionError:
        raise UserError("job file", f"{path} nests sections thousands of levels deep; a job file's sections are a few levels deep") from None
    if not isinstance(raw, dict):
        raise UserError("job file", f"{path} must be a YAML mapping with sections run, data, student, train")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, job_dir=os.path.dirname(os.path.abspath(path)))



def validate(raw: dict, job_dir: str = "") -> JobSpec:
    """A job as a dict (a parsed job file) -> a checked JobSpec."""
    spec = parse(raw, job_dir)
    _check(spec)
    return spec


def _check(spec: JobSpec) -> None:
    check_storage(spec)
    check_world_sizes(spec.train.global_batch_size, spec.train.micro_batch_size, *spec.train.worker_range)
    if spec.train.precision == "fp16" and not spec.train.use_gpu:
        raise UserError("train.precision", "fp16 needs CUDA (GradScaler is CUDA-only); set train.use_gpu: true, or use bf16 or fp32 on CPU")
    if spec.teacher is not None and spec.teacher.precision == "fp16" and not spec.teacher.pool.gpus_per_actor:
        raise UserError("teacher.precision", "fp16 needs CUDA; set teacher.pool.gpus_per_actor > 0, or use bf16 or fp32 on CPU")
    check_logging(spec)
    for i, callback in enumerate(spec.callbacks):
        try:
            import_callable(callback.callable, spec.job_dir)
        except ModelNameError as e:
            raise UserError(f"callbacks.{i}.callable", str(e)) from None
    if spec.task == "causal_lm":
        from kd_ray.checks_lm import check_lm

        check_lm(spec)
        if spec.teacher is not None and spec.teacher.cache is not None:
            check_token_cache(spec)
        return
    _check_classifier(spec)


def check_storage(spec: JobSpec) -> None:
    """run.storage_path: a local directory (or one to be made) that this user can write in, and
    no file where the run's directory goes; or a bucket that answers and takes a file. Checked
    before anything is created: a run that cannot write its summary fails while reporting its
    failure. Under `ray job submit`, no path may lie in Ray's copy of the working directory."""
    check_job_working_dir(spec)
    root = spec.run.storage_path
    if storage.is_remote(root):
        storage.check_reachable(root, "run.storage_path", write=True)
        return
    existing = root
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError("run.storage_path", f"{existing} is a file, so {root} cannot be a directory of runs; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError("run.storage_path", f"cannot write in {existing} (permission denied); choose a directory you can write in")
    if os.path.exists(spec.run_dir) and not os.path.isdir(spec.run_dir):
        raise UserError("run.name", f"{spec.run_dir} is a file, not a run directory; choose another run.name or move the file")


def check_job_working_dir(spec: JobSpec) -> None:
    """A submitted job runs in Ray's copy of --working-dir: what it writes there is deleted with
    the cluster's session (and a resubmitted job gets a new copy), and git-ignored files (runs/,
    weights) were never uploaded to it."""
    if spec.run.allow_job_working_dir:
        return
    for field, path in paths(spec):
        if storage.in_job_working_dir(path):
            raise UserError(field, f"{path} is inside the copy of --working-dir that Ray made for this job, which is deleted "
                            "with the cluster's session (and git-ignored files are not uploaded to it); give an absolute path "
                            "every node shares, or an s3:// or gs:// URI (or set run.allow_job_working_dir: true)")


def _check_classifier(spec: JobSpec) -> None:
    for name in ("text", "prompt", "response", "tokens", "tokenizer"):
        if getattr(spec.data, name) is not None:
            raise UserError(f"data.{name}", "only applies to task: causal_lm; remove it, or set task: causal_lm")
    if spec.distill.divergence != "forward":
        raise UserError("distill.loss", f"{spec.distill.loss} is for task: causal_lm; a classifier distills with hinton (forward KL)")
    facts = check_source(spec.data, spec.run.seed)
    sample_shape, max_label = facts.sample_shape, facts.max_label
    _check_training_rows(spec, facts.train_rows, facts.source_rows)
    if spec.teacher is not None:
        if not spec.teacher.weights:
            raise UserError("teacher.weights", "a teacher needs trained weights (a .safetensors or .pt file); train one with a job that has no teacher section")
        if spec.teacher.cached:
            if spec.teacher.cache is None:
                raise UserError("teacher.cache", "teacher.mode: cached reads the teacher's outputs from a cache; add teacher.cache: "
                                "{path: DIR} and write it with `kd-ray cache JOB.yaml`")
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
        raise UserError(f"{name}.model", f"{section.model}({shown(section.kwargs)}) failed: {type(e).__name__}: {e}") from None
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
    _check_cache_path(cache.path)
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


def check_token_cache(spec: JobSpec) -> None:
    """A language model's cache holds the teacher's top-k per token (kd_ray.cache_tokens)."""
    cache = spec.teacher.cache
    if cache.format != "topk":
        raise UserError("teacher.cache.format", "a language model's cache holds the teacher's top-k per token (a full row of "
                        "its vocabulary would cost ~100 KB a token); use format: topk, or leave it out")
    if cache.k is not None and cache.k != spec.distill.top_k:
        raise UserError("teacher.cache.k", f"{cache.k} is not distill.top_k ({spec.distill.top_k}): a language model's cache keeps "
                        "distill.top_k log-probabilities per token; remove teacher.cache.k and set distill.top_k")
    _check_cache_path(cache.path)
    check_cache_temperatures(spec)


def check_cache_temperatures(spec: JobSpec) -> None:
    """A top-k cache's temperatures: each > 0, and the job's among them when it trains from it."""
    cache, distill = spec.teacher.cache, spec.distill
    if cache.temperatures is not None and (not cache.temperatures or min(cache.temperatures) <= 0):
        raise UserError("teacher.cache.temperatures", f"{cache.temperatures}: give one or more temperatures, all > 0")
    if spec.teacher.cached:
        try:
            tail_column(tuple(cache_temperatures(spec)), distill.temperature)
        except ValueError:
            raise UserError("distill.temperature", f"{distill.temperature} is not among teacher.cache.temperatures {cache.temperatures}: "
                            "a top-k cache holds the tail mass only for those; add it there (and recapture) or use one of them") from None



def _check_cache_path(path: str) -> None:
    if storage.is_remote(path):
        storage.check_reachable(path, "teacher.cache.path")
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError("teacher.cache.path", f"{path} is a file; a cache is a directory (kd-ray cache writes it): choose another path")
    manifest = os.path.join(path, MANIFEST)
    if os.path.exists(manifest) and not os.path.isfile(manifest):
        raise UserError("teacher.cache.path", f"{manifest} is not a file, so {path} is not a kd_ray cache; choose another path")


def refuse_augmentation(spec: JobSpec) -> None:
    if spec.data.augment.active:
        raise UserError("data.augment", "random augmentation gives new inputs every epoch, but a teacher-output cache holds one "
                        "deterministic view per sample; remove data.augment (override data.augment={}) or use teacher.mode: online")



def _check_weights(section: ModelSpec, name: str, model) -> None:
    """Compare the file's tensor shapes with the model's, built on the meta device (no memory)."""
    path = section.weights
    check_weights_file(path, f"{name}.weights", model, section.model, "train it first (see README) or fix the path")


def check_weights_file(path: str, field: str, model, model_name: str, fix: str) -> None:
    """A state-dict file that fits `model` (built on the meta device): names and shapes; a
    local file or one on object storage."""
    if storage.is_remote(path):
        storage.need_object(path, field, fix)
    else:
        need_file(path, field, fix)
    if not storage.shown(path).endswith(weights.WEIGHT_SUFFIXES):
        raise UserError(field, f"{path}: use a .safetensors or .pt state dict")
    try:
        found = weights.file_shapes(path)
        expected = weights.model_shapes(model)
    except Exception as e:  # a user's file can fail in any way; report it on one line
        raise UserError(field, f"cannot read {path} as weights: {type(e).__name__}: {clip(str(e), SHOWN_CHARS)}") from None
    problem = weights.mismatch(expected, found)
    if problem:
        raise UserError(field, f"{storage.basename(path)} does not fit {model_name}: {problem}")
