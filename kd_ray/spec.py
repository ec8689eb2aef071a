"""The job spec: a YAML job file plus `a.b=c` overrides, validated before any work starts.

Every mistake a user can make here becomes a `UserError` naming the dotted field and the fix.
Relative paths in a job file are resolved against the job file's own directory, so a job runs
the same from any working directory.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd_ray.errors import UserError
from kd_ray.registry import ModelNameError, check_kwargs, resolve

Precision = Literal["fp32", "bf16", "fp16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RunSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = "runs"
    seed: int = 0
    max_failures: int = Field(3, ge=-1, description="worker/node failures to recover from (-1: no limit)")
    deterministic: bool = Field(False, description="deterministic kernels: a resumed run ends equal to an uninterrupted one")

    @field_validator("name")
    @classmethod
    def _not_a_parent(cls, name: str) -> str:
        if name in (".", ".."):
            raise ValueError("must name a directory of its own, not '.' or '..'")
        return name


class PreprocessSpec(_Section):
    """Deterministic: applied to train and eval alike, and safe to cache teacher outputs on."""

    scale: float = 1.0
    mean: Union[float, list[float]] = 0.0
    std: Union[float, list[float]] = 1.0


class AugmentSpec(_Section):
    """Random: applied to training samples only, before the teacher sees them."""

    noise_std: float = Field(0.0, ge=0)
    shift: int = Field(0, ge=0, description="random translation of the last two axes, in pixels")
    hflip: bool = False

    @property
    def active(self) -> bool:
        return bool(self.noise_std or self.shift or self.hflip)


class DataSpec(_Section):
    source: str
    features: str = "x"
    labels: str = "y"
    id_column: Optional[str] = None
    shape: Optional[list[int]] = None
    num_classes: Optional[int] = Field(None, ge=2)
    preprocess: PreprocessSpec = PreprocessSpec()
    augment: AugmentSpec = AugmentSpec()
    shuffle: Literal["global", "local", "none"] = "global"
    shuffle_window: int = Field(4, ge=1, description="parquet row groups read and shuffled together")
    eval_split: float = Field(0.2, ge=0, lt=1)
    eval_source: Optional[str] = None


class ModelSpec(_Section):
    model: str
    kwargs: dict[str, Any] = {}
    weights: Optional[str] = None


class PoolSpec(_Section):
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0, ge=0)
    cpus_per_actor: float = Field(1, gt=0)
    batch_size: int = Field(256, ge=1)
    resources: dict[str, float] = {}

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self


class CacheSpec(_Section):
    """Where `kd-ray cache` writes the teacher's outputs, and in what form (see kd_ray.cache)."""

    path: str = Field(description="a directory, or any URI pyarrow opens (file://, s3://, gs://)")
    format: Literal["full", "topk"] = "full"
    k: Optional[int] = Field(None, ge=1, description="topk: classes kept per sample")
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(None, description="default: float32 (full), float16 (topk)")
    temperatures: Optional[list[float]] = Field(None, description="topk: the T its tail mass is exact for; default [distill.temperature]")

    @property
    def value_dtype(self) -> str:
        return self.dtype or ("float32" if self.format == "full" else "float16")


class TeacherSpec(ModelSpec):
    pool: PoolSpec = PoolSpec()
    precision: Precision = "fp32"
    compile: bool = False
    logits_dtype: Literal["float32", "float16"] = "float32"
    mode: Literal["online", "cached"] = Field("online", description="cached: read teacher.cache instead of running the teacher")
    cache: Optional[CacheSpec] = None

    @property
    def cached(self) -> bool:
        return self.mode == "cached"


class DistillSpec(_Section):
    loss: Literal["hinton"] = "hinton"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs cross-entropy")


class OptimizerSpec(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0)


class ScheduleSpec(_Section):
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainSpec(_Section):
    epochs: Optional[int] = Field(None, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    global_batch_size: int = Field(ge=1)
    micro_batch_size: int = Field(ge=1)
    num_workers: Union[int, tuple[int, int]] = Field(1, description="a number, or [min, max] for an elastic group")
    resize_check_seconds: float = Field(60, gt=0, description="elastic: how often Ray Train looks for room to grow")
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = {}
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    grad_clip: Optional[float] = Field(1.0, gt=0)
    precision: Precision = "fp32"
    compile: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None
    strategy: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = Field(10, ge=1)
    prefetch_batches: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _budget(self):
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set epochs or max_steps (or both: training stops at whichever comes first)")
        low, high = self.worker_range
        if low < 1 or high < low:
            raise ValueError(f"num_workers must be a number >= 1 or [min, max] with 1 <= min <= max (got {self.num_workers})")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        return (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else tuple(self.num_workers)

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]


class CheckpointSpec(_Section):
    every_steps: Optional[int] = Field(None, ge=1)
    every_minutes: Optional[float] = Field(None, gt=0)
    keep: int = Field(2, ge=1)
    poll_every_steps: int = Field(10, ge=1, description="how often workers check for preemption, a stop request and the timer")


class EvalSpec(_Section):
    every_epochs: int = Field(1, ge=0, description="0 evaluates only at the end")
    batch_size: int = Field(512, ge=1)


class ProfileSpec(_Section):
    start_step: Optional[int] = Field(None, ge=1, description="record a torch.profiler trace after this optimizer step (none: off)")
    steps: int = Field(5, ge=1, description="how many optimizer steps the trace covers")
    memory: bool = Field(True, description="on CUDA, also a memory snapshot of the same steps")


class JobSpec(_Section):
    run: RunSpec
    data: DataSpec
    teacher: Optional[TeacherSpec] = None
    student: ModelSpec
    distill: DistillSpec = DistillSpec()
    train: TrainSpec
    checkpoint: CheckpointSpec = CheckpointSpec()
    eval: EvalSpec = EvalSpec()
    profile: ProfileSpec = ProfileSpec()
    # Where the job file lives: its directory is importable and anchors relative paths.
    job_dir: str = ""

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.storage_path, self.run.name)

    @property
    def runs_teacher_pool(self) -> bool:
        """Whether a run starts the teacher's actor pool: a teacher that is not read from a cache."""
        return self.teacher is not None and not self.teacher.cached


# ---------------------------------------------------------------------------------------------
# Loading


def load_job(path: str, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override, validate and resolve a job file. Raises UserError on any mistake."""
    if not os.path.isfile(path):
        raise UserError("job file", f"{path} does not exist; pass the path of a YAML job file such as jobs/quickstart.yaml")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError("job file", f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError("job file", f"{path} must be a YAML mapping with sections run, data, student, train")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, job_dir=os.path.dirname(os.path.abspath(path)))


def apply_override(raw: dict, item: str) -> None:
    """`train.epochs=3` sets raw['train']['epochs'] = 3; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError("override", f"'{item}' is not of the form section.key=value, e.g. train.epochs=3")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(".".join(parts[: i + 1]), f"is not a section, so '{item}' cannot set a key inside it")
        node = child
    node[parts[-1]] = parsed


def validate(raw: dict, job_dir: str = "") -> JobSpec:
    try:
        spec = JobSpec.model_validate({**raw, "job_dir": job_dir})
    except ValidationError as e:
        raise _one_line(e) from None
    _resolve_paths(spec)
    _check(spec)
    return spec


def _fields_at(loc: tuple) -> list[str]:
    """The field names allowed at a location, for did-you-mean."""
    model: Any = JobSpec
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for arg in getattr(ann, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                ann = arg
        model = ann
    return [f for f in getattr(model, "model_fields", {}) if f != "job_dir"]


def _clean_loc(loc: tuple, keep_last: bool) -> tuple:
    """Keep the job-file keys of a pydantic location, dropping union members like 'list[float]'."""
    kept: list = []
    for i, part in enumerate(loc):
        prefix = tuple(k for k in kept if isinstance(k, str))
        if isinstance(part, int) or part in _fields_at(prefix) or (keep_last and i == len(loc) - 1):
            kept.append(part)
    return tuple(kept)


def _one_line(e: ValidationError) -> UserError:
    err = e.errors()[0]
    loc = _clean_loc(tuple(err["loc"]), keep_last=err["type"] == "extra_forbidden")
    field = ".".join(str(p) for p in loc) or "job file"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys here: {', '.join(allowed)}"
        return UserError(field, f"unknown key; {fix}")
    if kind == "missing":
        return UserError(field, "is required; add it to the job file")
    msg = err["msg"]
    if kind.startswith("literal_error"):
        return UserError(field, f"{msg} (got {err.get('input')!r})")
    return UserError(field, f"{msg} (got {err.get('input')!r})" if "input" in err and kind != "value_error" else msg.removeprefix("Value error, "))


# ---------------------------------------------------------------------------------------------
# Paths and cross-field checks


def _abs(path: str, job_dir: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(job_dir, os.path.expanduser(path)))


def _resolve_paths(spec: JobSpec) -> None:
    jd = spec.job_dir or os.getcwd()
    spec.run.storage_path = _abs(spec.run.storage_path, jd)
    if not spec.data.source.startswith("builtin:"):
        spec.data.source = _abs(spec.data.source, jd)
    if spec.data.eval_source:
        spec.data.eval_source = _abs(spec.data.eval_source, jd)
    if spec.data.labels.endswith(".npy"):
        spec.data.labels = _abs(spec.data.labels, jd)
    for section in (spec.teacher, spec.student):
        if section is not None and section.weights:
            section.weights = _abs(section.weights, jd)
    if spec.teacher is not None and spec.teacher.cache is not None:
        spec.teacher.cache.path = _abs(spec.teacher.cache.path, jd)


def _check(spec: JobSpec) -> None:
    from kd_ray.data.sources import check_source
    from kd_ray.batching import check_world_sizes

    if "://" in spec.run.storage_path:
        raise UserError("run.storage_path", "remote storage URIs are not supported yet; use a directory every node shares (an NFS or EFS mount)")
    sample_shape, max_label = check_source(spec.data)
    check_world_sizes(spec.train.global_batch_size, spec.train.micro_batch_size, *spec.train.worker_range)
    if spec.train.precision == "fp16" and not spec.train.use_gpu:
        raise UserError("train.precision", "fp16 needs CUDA (GradScaler is CUDA-only); set train.use_gpu: true, or use bf16 or fp32 on CPU")
    if spec.teacher is not None:
        if spec.teacher.precision == "fp16" and not spec.teacher.pool.gpus_per_actor:
            raise UserError("teacher.precision", "fp16 needs CUDA; set teacher.pool.gpus_per_actor > 0, or use bf16 or fp32 on CPU")
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
    if max_label is not None and outputs.get("student") is not None and max_label >= outputs["student"]:
        raise UserError("student.kwargs", f"the labels go up to {max_label} but {spec.student.model} gives {outputs['student']} outputs per sample; give it {max_label + 1} classes")
    if classes and outputs.get("student") not in (None, classes):
        raise UserError("student.kwargs", f"{spec.student.model} gives {outputs['student']} outputs per sample but data.num_classes is {classes}; set its number of classes to {classes}")
    if None not in (outputs.get("student"), outputs.get("teacher")) and outputs["student"] != outputs["teacher"]:
        raise UserError("teacher.kwargs", f"the teacher gives {outputs['teacher']} outputs per sample and the student {outputs['student']}; distillation needs the same classes in both")
    if spec.teacher is not None and spec.teacher.cache is not None:
        check_cache(spec, outputs.get("teacher"))


# Below these sizes the shape probe runs for real on the CPU, in milliseconds: the meta device's
# first forward imports torch's decompositions, ~1.5 s of every small job's start.
PROBE_ON_CPU_PARAMS = 2_000_000
PROBE_ON_CPU_SAMPLE = 1 << 18


def check_model(section: ModelSpec, name: str, job_dir: str, sample_shape: tuple[int, ...] | None) -> int | None:
    """Resolve the model, check its kwargs and weights, and return its number of outputs for
    one sample (found by a forward of 2 samples: on the meta device, no memory and no compute,
    for a large model or sample), when the sample shape is known."""
    try:
        factory = resolve(section.model, job_dir)
        check_kwargs(section.model, factory, section.kwargs)
    except ModelNameError as e:
        raise UserError(f"{name}.model", str(e)) from None
    if section.weights:
        _check_weights(section, name, job_dir, factory)
    if sample_shape is None:
        return None
    import torch

    try:
        with torch.device("meta"):
            model = factory(**section.kwargs)
        params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
        small = params <= PROBE_ON_CPU_PARAMS and math.prod(sample_shape) <= PROBE_ON_CPU_SAMPLE
        with torch.no_grad(), torch.device("cpu" if small else "meta"):
            out = (factory(**section.kwargs) if small else model)(torch.zeros((2, *sample_shape)))
    except Exception as e:  # any failure of the user's forward on this shape is the user's to fix
        raise UserError(f"{name}.model", f"{section.model} cannot take samples of shape {list(sample_shape)} ({type(e).__name__}: {e}); check data.shape and the model's kwargs") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise UserError(f"{name}.model", f"{section.model} must return logits of shape [batch, classes], got {getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[-1])


def check_cache(spec: JobSpec, classes: int | None) -> None:
    """The teacher.cache block: a format its options fit, and a top-k with room in the classes
    (when they are known: here from the sample shape, in `kd-ray cache` from the data)."""
    cache, distill = spec.teacher.cache, spec.distill
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
    if cache.temperatures is not None and (not cache.temperatures or min(cache.temperatures) <= 0):
        raise UserError("teacher.cache.temperatures", f"{cache.temperatures}: give one or more temperatures, all > 0")
    if spec.teacher.cached:
        from kd_ray.losses import tail_column

        try:
            tail_column(tuple(cache_temperatures(spec)), distill.temperature)
        except ValueError:
            raise UserError("distill.temperature", f"{distill.temperature} is not among teacher.cache.temperatures {cache.temperatures}: "
                            "a top-k cache holds the tail mass only for those; add it there (and recapture) or use one of them") from None


def cache_temperatures(spec: JobSpec) -> list[float]:
    """The temperatures a top-k capture records the tail mass for."""
    cache = spec.teacher.cache
    return [float(t) for t in cache.temperatures] if cache.temperatures else [float(spec.distill.temperature)]


def refuse_augmentation(spec: JobSpec) -> None:
    if spec.data.augment.active:
        raise UserError("data.augment", "random augmentation gives new inputs every epoch, but a teacher-output cache holds one "
                        "deterministic view per sample; remove data.augment (override data.augment={}) or use teacher.mode: online")


def _check_weights(section: ModelSpec, name: str, job_dir: str, factory) -> None:
    """Compare the file's tensor shapes with the model's, built on the meta device (no memory)."""
    import torch

    from kd_ray import weights

    path = section.weights
    if "://" not in path and not os.path.isfile(path):
        raise UserError(f"{name}.weights", f"{path} does not exist; train it first (see README) or fix the path")
    if not path.endswith(weights.WEIGHT_SUFFIXES):
        raise UserError(f"{name}.weights", f"{path}: use a .safetensors or .pt state dict")
    if "://" in path:
        return
    try:
        with torch.device("meta"):
            model = factory(**section.kwargs)
        found = weights.file_shapes(path)
        expected = weights.model_shapes(model)  # inside the try: a factory may return a non-Module
    except Exception as e:  # a user's factory or file can fail in any way; report it on one line
        raise UserError(f"{name}.weights", f"cannot read {path} or build the model to check it: {type(e).__name__}: {e}") from None
    problem = weights.mismatch(expected, found)
    if problem:
        raise UserError(f"{name}.weights", f"{os.path.basename(path)} does not fit {section.model}{section.kwargs or ''}: {problem}")



# ---------------------------------------------------------------------------------------------
# Resume compatibility

# What a checkpoint's weights, optimizer state and data cursor mean: a resume that changes any of
# these would train a different run under the old name. Everything else (epochs, max_steps, micro
# batch, workers, precision, pools, logging, eval, checkpoint cadence) may change between attempts.
FIXED_ON_RESUME = (
    "run.seed", "data.source", "data.eval_source", "data.features", "data.labels", "data.id_column", "data.shape",
    "data.eval_split", "data.shuffle", "data.shuffle_window", "data.preprocess", "data.augment",
    "student.model", "student.kwargs", "teacher.model", "teacher.kwargs", "teacher.weights",
    "distill", "train.global_batch_size", "train.optimizer", "train.schedule", "train.grad_clip",
)


def fingerprint(spec: JobSpec, train_rows: int) -> dict[str, Any]:
    """The fields a resume must not change, as JSON-ready values (plus the number of training
    rows: the same path holding other data is a different run)."""
    dumped = spec.model_dump(mode="json")
    out: dict[str, Any] = {"data.train_rows": train_rows}
    for key in FIXED_ON_RESUME:
        node: Any = dumped
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    cache = spec.teacher.cache if spec.teacher is not None and spec.teacher.cached else None
    if cache is not None and cache.format == "topk":
        # A top-k cache changes the loss. Full logits train as the live pool does, so a run may
        # switch between online and a full cache when it resumes (and older checkpoints, which
        # lack this key, still match).
        out["teacher.outputs"] = f"top-{cache.k} {cache.value_dtype}"
    return out


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
