"""The job schema: what a YAML job file may say, `a.b=c` overrides, and one line per mistake.

Every mistake the schema can see becomes a `UserError` naming the dotted field and the fix.
Relative paths in a job file are resolved against the job file's own directory, so a job runs
the same from any working directory. Checks that open files or import models live in
kd_ray.checks, which is also the way in (`load_job`, `validate`). The schema is also the one home
of which fields identify a run and a teacher's outputs (`FIXED_ON_RESUME`, `*_IDENTITY`).
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kd_ray.core import storage
from kd_ray.core.errors import SHOWN_CHARS, UserError, clip, shown
from kd_ray.core.storage import is_remote, need_file

Precision = Literal["fp32", "bf16", "fp16"]


def _numeric(annotation: Any) -> bool:
    """A number field (int or float, alone, optional or in a union), which YAML's true/false must
    not fill: pydantic takes true as 1."""
    return annotation in (int, float) or any(_numeric(a) for a in get_args(annotation) if a is not type(None))


class _Section(BaseModel):
    # An infinite or NaN number is never what a job means (lr: .inf, scale: .nan), and it fails
    # far from the field: refused here for every float of the schema.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field is not None and _numeric(field.annotation):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        # pydantic takes "yes", "off", 1 or "0" for a switch; a job file that quotes one (report:
        # "no" is True to nobody but YAML's string rules) would get the opposite of what it says.
        if field is not None and field.annotation is bool and not isinstance(value, bool):
            raise ValueError(f"must be true or false (unquoted), not {shown(value)}")
        return value


class RunSpec(_Section):
    # A run directory's name, and a moved-aside run's NAME.<timestamp>, must fit a file name (255 bytes).
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=200)
    storage_path: str = "runs"
    seed: int = Field(0, ge=0, lt=2**63, description="seeds torch and numpy, which take 64-bit integers")
    max_failures: int = Field(3, ge=-1, description="worker/node failures to recover from (-1: no limit)")
    deterministic: bool = Field(False, description="deterministic kernels: a resumed run ends equal to an uninterrupted one")
    allow_job_working_dir: bool = Field(False, description="let paths resolve inside the copy of --working-dir that Ray makes "
                                        "for a submitted job (it is deleted with the cluster's session)")

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

    @field_validator("std")
    @classmethod
    def _divides(cls, std: Union[float, list[float]]) -> Union[float, list[float]]:
        if 0 in (std if isinstance(std, list) else [std]):
            raise ValueError("must not be 0 (samples are divided by it); use 1 to leave them unscaled")
        return std


class AugmentSpec(_Section):
    """Random: applied to training samples only, before the teacher sees them."""

    noise_std: float = Field(0.0, ge=0)
    shift: int = Field(0, ge=0, description="random translation of the last two axes, in pixels")
    hflip: bool = False

    @property
    def active(self) -> bool:
        return bool(self.noise_std or self.shift or self.hflip)


Source = Union[str, Annotated[list[str], Field(min_length=1)]]  # a list of files: causal_lm (kd_ray.data.text)


class DataSpec(_Section):
    source: Source
    features: str = "x"
    labels: str = "y"
    id_column: Optional[str] = None
    shape: Optional[list[Annotated[int, Field(ge=1)]]] = Field(None, min_length=1)
    num_classes: Optional[int] = Field(None, ge=2)
    preprocess: PreprocessSpec = PreprocessSpec()
    augment: AugmentSpec = AugmentSpec()
    shuffle: Literal["global", "local", "none"] = "global"
    shuffle_window: int = Field(4, ge=1, description="parquet row groups read and shuffled together")
    eval_split: float = Field(0.2, ge=0, lt=1)
    eval_source: Optional[Source] = None
    # task: causal_lm (kd_ray.data.text): documents as text, prompt + response, or token ids, cut
    # and packed (or padded) into rows of max_seq_len tokens by data.tokenizer.
    text: Optional[str] = Field(None, description="causal_lm: column of plain text (every token carries loss)")
    prompt: Optional[str] = Field(None, description="causal_lm: column of prompts (no loss), with data.response")
    response: Optional[str] = Field(None, description="causal_lm: column of responses (the loss covers these tokens)")
    tokens: Optional[str] = Field(None, description="causal_lm: column of token ids (list<int>), already tokenized")
    messages: Optional[str] = Field(None, description="causal_lm: column of conversations (lists of {role, content}), rendered with "
                                                      "the tokenizer's chat template; the loss covers the assistant's turns")
    chat_template: bool = Field(False, description="causal_lm: render data.prompt + data.response as a user turn and an assistant "
                                                   "turn with the tokenizer's chat template (as instruction-tuned models saw them)")
    tokenizer: Optional[str] = Field(None, description="causal_lm: a tokenizer.json, a directory holding one, or 'teacher'")
    max_seq_len: int = Field(512, ge=2, description="causal_lm: tokens per row; longer documents are cut")
    packing: Literal["pack", "pad"] = Field("pack", description="causal_lm: pack documents into rows, or one per row padded")
    max_documents: Optional[int] = Field(None, ge=1, description="causal_lm: read only the first N documents of data.source "
                                                                 "(a sample of a large corpus, e.g. to capture a cache of)")
    in_memory_tokens: int = Field(8 << 20, ge=0, description="causal_lm: a split of at most this many tokens is read whole by each "
                                  "process that reads it (16 bytes a token), so a global shuffle permutes every row; a larger one "
                                  "is streamed row group by row group, data.shuffle_window row groups shuffled together")
    prepared: Optional[str] = Field(None, description="causal_lm: where the token shards are prepared (kd_ray.data.token_shards), "
                                                      "a directory or URI; default: `prepared` under run.storage_path")
    stream: Literal["auto", "ray_data"] = Field(
        "auto", description="auto: with no teacher pool, data in memory and CPU workers, each train worker reads its own "
                            "micro-batches (kd_ray.data.local.LocalStream); ray_data: always through Ray Data's stream")


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


# A cache is a directory holding this manifest next to its shards (kd_ray.cache).
CACHE_MANIFEST = "manifest.json"


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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="auto: bf16 where the device computes it natively (a GPU that has it, a CPU with AMX), else "
        "fp16 on a GPU and fp32 on a CPU (kd_ray.models.precision.resolve)")
    compile: bool = False
    logits_dtype: Literal["float32", "float16"] = "float32"
    mode: Literal["online", "cached"] = Field("online", description="cached: read teacher.cache instead of running the teacher")
    cache: Optional[CacheSpec] = None
    placement: Literal["pool", "colocated"] = Field(
        "pool", description="pool: a Ray Data actor pool streams the teacher's signal to the train workers (teacher.pool); "
        "colocated: each train worker runs the teacher itself, on its own micro-batches (FSDP2-sharded with train.strategy: fsdp)")

    @property
    def cached(self) -> bool:
        return self.mode == "cached"

    @property
    def colocated(self) -> bool:
        return self.placement == "colocated"


class DistillSpec(_Section):
    loss: Literal["hinton", "forward_kl", "reverse_kl", "jsd", "sampled_token"] = Field(
        "hinton", description="hinton = forward_kl: KL(teacher || student) x T^2; causal_lm also takes reverse_kl and jsd, and "
                              "on-policy sampled_token: per generated token log p_student - log p_teacher at the sampled token")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs cross-entropy")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: the teacher's weight in the mixture")
    top_k: int = Field(64, ge=1, description="causal_lm: teacher log-probabilities sent per token (plus the exact tail)")
    chunk_tokens: int = Field(1024, ge=1, description="causal_lm: tokens whose logits are made at once in the loss")

    @property
    def divergence(self) -> str:
        return {"hinton": "forward", "forward_kl": "forward", "reverse_kl": "reverse", "jsd": "jsd", "sampled_token": "sampled"}[self.loss]


class RolloutPoolSpec(_Section):
    """The rollout actors (kd_ray.rollouts): each holds a copy of the student and generates from
    its published weights; on-policy, the teacher runs in teacher.pool.max_actors actors beside them."""

    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1, gt=0)
    gpus_per_actor: float = Field(0, ge=0)
    batch_size: int = Field(8, ge=1, description="prompts generated together (a fixed shape: a prompt's rollout does not depend "
                                                 "on which others share its batch)")
    resources: dict[str, float] = {}


class OnPolicySpec(_Section):
    """causal_lm: the student generates continuations of the data's prompts and the teacher scores
    every generated token (kd_ray.rollouts)."""

    fraction: float = Field(1.0, ge=0, le=1, description="of each micro-batch's rows, the share the student generates (GKD's lambda; "
                                                         "0 trains on the data's responses, with on-policy evaluation)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens holding this much probability")
    stop_on_eos: bool = Field(True, description="a rollout ends at the tokenizer's end-of-text token")
    prompt_tokens: Optional[int] = Field(None, ge=1, description="data.text: a row's first N tokens are its prompt (prompt/response "
                                                                 "and messages data: the tokens before the first response token)")
    sync_every: int = Field(1, ge=1, description="optimizer steps between two publications of the student's weights")
    max_staleness: int = Field(1, ge=0, description="a step trains on rollouts of weights at most this many steps old (0: generation "
                                                    "and training alternate; 1: the next step's generation overlaps this one)")
    eval_prompts: int = Field(32, ge=1, description="held-out prompts the student generates for at each evaluation (fixed seeds)")
    samples: int = Field(4, ge=0, description="held-out prompts whose continuations, the student's beside the teacher's, a finished "
                                              "run writes to RUN_DIR/samples.md")
    pool: RolloutPoolSpec = RolloutPoolSpec()


class OptimizerSpec(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
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
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in the backward pass")
    fsdp_block: Optional[str] = Field(None, description="class name of the blocks FSDP2 shards one by one (default: "
                                                        "the model's repeated layer class; top-level children for classifiers)")
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
    poll_every_steps: Optional[int] = Field(None, ge=1, description="how often workers check for preemption, a stop request and the "
                                            "timer (default: every 10 steps, or about once a second when steps are faster)")


class EvalSpec(_Section):
    every_epochs: int = Field(1, ge=0, description="0 evaluates only at the end")
    batch_size: int = Field(512, ge=1)


class ProfileSpec(_Section):
    start_step: Optional[int] = Field(None, ge=1, description="record a torch.profiler trace after this optimizer step (none: off)")
    steps: int = Field(5, ge=1, description="how many optimizer steps the trace covers")
    memory: bool = Field(True, description="on CUDA, also a memory snapshot of the same steps")


class MlflowSpec(_Section):
    tracking_uri: Optional[str] = Field(None, description="an MLflow server (http://...) or a directory (a file store); "
                                                          "default: $MLFLOW_TRACKING_URI")
    experiment: str = "kd_ray"


class LoggingSpec(_Section):
    """Where a run's figures go besides RUN_DIR/metrics.jsonl, which is always written (kd_ray.run.metrics)."""

    tensorboard: bool = Field(True, description="event files under RUN_DIR/tensorboard")
    mlflow: Optional[MlflowSpec] = Field(None, description="also log params, metrics and the exported student to MLflow")
    report: bool = Field(True, description="a finished run draws RUN_DIR/report.png (needs matplotlib)")


class CallbackSpec(_Section):
    """A user's kd_ray.callbacks.Callback, built in every train worker and capture actor."""

    callable: str = Field(pattern=r"^[^:]+:[^:]+$", description="package.module:callable returning a kd_ray.callbacks.Callback")
    kwargs: dict[str, Any] = {}


class JobSpec(_Section):
    task: Literal["classify", "causal_lm"] = "classify"
    run: RunSpec
    data: DataSpec
    teacher: Optional[TeacherSpec] = None
    student: ModelSpec
    distill: DistillSpec = DistillSpec()
    onpolicy: Optional[OnPolicySpec] = Field(None, description="causal_lm: on-policy distillation (kd_ray.rollouts)")
    train: TrainSpec
    checkpoint: CheckpointSpec = CheckpointSpec()
    eval: EvalSpec = EvalSpec()
    profile: ProfileSpec = ProfileSpec()
    logging: LoggingSpec = LoggingSpec()
    callbacks: list[CallbackSpec] = []
    # Where the job file lives: its directory is importable and anchors relative paths.
    job_dir: str = ""

    @model_validator(mode="after")
    def _token_cache(self):
        # A language model's cache is always a top-k per token (kd_ray.tasks.causal_lm_checks refuses format:
        # full, whose rows of a 49k vocabulary would be ~100 KB a token), so the format may be left out.
        cache = self.teacher.cache if self.teacher is not None else None
        if self.task == "causal_lm" and cache is not None and "format" not in cache.model_fields_set:
            cache.format = "topk"
        return self

    @property
    def run_dir(self) -> str:
        return storage.join(self.run.storage_path, self.run.name)

    @property
    def runs_teacher_pool(self) -> bool:
        """Whether a run starts the teacher's actor pool: a teacher neither read from a cache nor colocated."""
        return self.teacher is not None and not self.teacher.cached and not self.teacher.colocated

    @property
    def teacher_in_stream(self) -> bool:
        """Whether the teacher pool is a stage of the training stream: off-policy; on-policy the
        train workers send their rows through the rollout and teacher actors (kd_ray.rollouts)."""
        return self.runs_teacher_pool and self.onpolicy is None

    @property
    def colocated_teacher(self) -> bool:
        """Whether each train worker runs the teacher itself (teacher.placement: colocated)."""
        return self.teacher is not None and self.teacher.colocated

    @property
    def teacher_gpus(self) -> float:
        """GPUs the teacher runs on, per process: its pool actor's, or a train worker's when colocated."""
        if self.teacher is None:
            return 0
        return float(self.train.use_gpu) if self.teacher.colocated else self.teacher.pool.gpus_per_actor


# ---------------------------------------------------------------------------------------------
# Loading

# Past these a job file is not a job file: the depth of a section a job names is under 10, and a
# YAML file of nested aliases (a "billion laughs") names billions of values in a few lines.
MAX_DEPTH = 64
MAX_VALUES = 100_000


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: YAML keeps the last one
    silently, and a repeated section or key is a mistake the user would never see."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float)):
                continue  # an unhashable key: SafeLoader's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {shown(key, 60)} appears twice in the same section; "
                                                        "keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """A job file's or an override's YAML. Raises yaml.YAMLError (a repeated key too) or
    RecursionError (nesting deeper than Python's stack)."""
    return yaml.load(text, Loader=_Loader)


def check_size(raw: Any, where: str) -> None:
    """Refuse a job nested too deep or holding too many values, before anything walks it
    (pydantic, a repr in a message, a fingerprint). Stops at the first excess: cheap even for a
    structure of aliases that would expand to gigabytes, or one that contains itself."""
    count, stack = 0, [(raw, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise UserError("job file", f"{where} nests sections more than {MAX_DEPTH} deep; a job file's sections are a few levels deep")
        if count > MAX_VALUES:
            raise UserError("job file", f"{where} holds more than {MAX_VALUES:,} values (YAML aliases repeat what they name); "
                            "write the job's values out, without aliases that multiply")
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ()
        stack.extend((child, depth + 1) for child in children)


def apply_override(raw: dict, item: str) -> None:
    """`train.epochs=3` sets raw['train']['epochs'] = 3; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError("override", f"{shown(item)} is not of the form section.key=value, e.g. train.epochs=3")
    parts = key.split(".")
    if "" in parts:
        raise UserError("override", f"{shown(item)}: {shown(key)} has an empty part (a leading, trailing or doubled dot); "
                        "write section.key=value, e.g. train.epochs=3")
    try:
        parsed = load_yaml(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    except RecursionError:
        raise UserError("override", f"{shown(item)} nests its value more than {MAX_DEPTH} deep") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(".".join(parts[: i + 1]), f"is not a section, so {shown(item)} cannot set a key inside it")
        node = child
    node[parts[-1]] = parsed


def read_job_file(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A job file as a dict, with `a.b=c` overrides applied (kd_ray.checks.load_job validates it).
    Raises UserError naming the job file for a file that is not UTF-8 YAML holding a mapping."""
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
    return raw


def parse(raw: dict, job_dir: str = "") -> JobSpec:
    """The schema's checks and the paths resolved; kd_ray.checks.validate adds the checks that read files."""
    check_size(raw, "the job")
    try:
        spec = JobSpec.model_validate({**raw, "job_dir": job_dir})
    except ValidationError as e:
        raise _one_line(e) from None
    _resolve_paths(spec)
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
    # The deepest error: for a value of a union (a number or a list of numbers), the member its
    # shape matched says what is wrong inside it ("mean.0: finite number", not "mean: not a number").
    errors = e.errors()
    err = max(errors, key=lambda x: (len(x["loc"]), -errors.index(x)))
    loc = _clean_loc(tuple(err["loc"]), keep_last=err["type"] == "extra_forbidden")
    field = clip(".".join(str(p) for p in loc), SHOWN_CHARS) or "job file"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1])[:SHOWN_CHARS], allowed, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys here: {', '.join(allowed)}"
        return UserError(field, f"unknown key; {fix}")
    if kind == "missing":
        return UserError(field, "is required; add it to the job file")
    msg = err["msg"]
    if "input" in err and kind != "value_error":
        return UserError(field, f"{msg} (got {shown(err['input'])})")
    return UserError(field, msg.removeprefix("Value error, "))


# ---------------------------------------------------------------------------------------------
# Paths


def _abs(path: str, job_dir: str) -> str:
    if is_remote(path) or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(job_dir, os.path.expanduser(path)))


def _abs_source(source: str | list[str], job_dir: str) -> str | list[str]:
    if isinstance(source, list):
        return [_abs_source(s, job_dir) for s in source]
    return source if source.startswith("builtin:") else _abs(source, job_dir)


def source_paths(source: str | list[str] | None) -> list[str]:
    """The files, directories or URIs a data source names (none for a built-in)."""
    listed = source if isinstance(source, list) else [source] if source else []
    return [s for s in listed if not s.startswith("builtin:")]


def _resolve_paths(spec: JobSpec) -> None:
    jd = spec.job_dir or os.getcwd()
    spec.run.storage_path = _abs(spec.run.storage_path, jd)
    spec.data.source = _abs_source(spec.data.source, jd)
    if spec.data.eval_source:
        spec.data.eval_source = _abs_source(spec.data.eval_source, jd)
    if spec.data.prepared:
        spec.data.prepared = _abs(spec.data.prepared, jd)
    if spec.data.labels.endswith(".npy"):
        spec.data.labels = _abs(spec.data.labels, jd)
    for section in (spec.teacher, spec.student):
        if section is not None and section.weights:
            section.weights = _abs(section.weights, jd)
    if spec.teacher is not None and spec.teacher.cache is not None:
        spec.teacher.cache.path = _abs(spec.teacher.cache.path, jd)
    mlflow = spec.logging.mlflow
    if mlflow is not None and mlflow.tracking_uri and ":" not in mlflow.tracking_uri:  # a directory: a file store
        mlflow.tracking_uri = _abs(mlflow.tracking_uri, jd)


def paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, path) of every file or directory a job reads or writes, as resolved."""
    out = [("run.storage_path", spec.run.storage_path)]
    out += [(field, path) for field in ("data.source", "data.eval_source") for path in source_paths(getattr(spec.data, field[5:]))]
    if spec.data.prepared:
        out.append(("data.prepared", spec.data.prepared))
    if spec.data.labels.endswith(".npy"):
        out.append(("data.labels", spec.data.labels))
    out += [(f"{name}.weights", section.weights) for name, section in (("teacher", spec.teacher), ("student", spec.student))
            if section is not None and section.weights]
    if spec.teacher is not None and spec.teacher.cache is not None:
        out.append(("teacher.cache.path", spec.teacher.cache.path))
    return out


def cache_temperatures(spec: JobSpec) -> list[float]:
    """The temperatures a top-k capture records the tail mass for."""
    cache = spec.teacher.cache
    return [float(t) for t in cache.temperatures] if cache.temperatures else [float(spec.distill.temperature)]


# ---------------------------------------------------------------------------------------------
# Resume compatibility

# What a checkpoint's weights, optimizer state and data cursor mean: a resume that changes any of
# these would train a different run under the old name. Everything else (epochs, max_steps, micro
# batch, workers, precision, pools, logging, eval, checkpoint cadence) may change between attempts.
# The teacher's outputs are a function of these (a teacher-output cache is checked against them,
# kd_ray.cache), and so is what a run trains on.
TEACHER_IDENTITY = ("teacher.model", "teacher.kwargs", "teacher.weights")
INPUT_IDENTITY = ("data.features", "data.shape", "data.preprocess")
DATA_IDENTITY = ("data.source", "data.eval_source")
FIXED_ON_RESUME = (
    "run.seed", *DATA_IDENTITY, *INPUT_IDENTITY, "data.labels", "data.id_column", "data.eval_split", "data.shuffle",
    "data.shuffle_window", "data.augment", "student.model", "student.kwargs", *TEACHER_IDENTITY,
    "distill", "train.global_batch_size", "train.optimizer", "train.schedule", "train.grad_clip",
)
# The distillation fields a classifier's run is (and always was) a function of; the rest of the
# section (chunking) only regroups the arithmetic.
DISTILL_FIXED = ("loss", "temperature", "alpha")
# A language model's documents: the data fields that name their columns, one list for the checks,
# the reader and the cache.
LM_COLUMN_FIELDS = ("text", "prompt", "response", "tokens", "messages")
# How a language model's rows are made: its run (LM_FIXED_ON_RESUME) and its teacher-output cache
# (kd_ray.cache.tokens) are functions of these data fields.
LM_ROW_FIELDS = (*LM_COLUMN_FIELDS, "chat_template", "tokenizer", "max_seq_len", "packing", "max_documents")
# A language model's run is also a function of how its rows are made and what the teacher sends.
# On-policy, what each rollout is a function of (kd_ray.rollouts); the rollout pool only places them.
ROLLOUT_FIELDS = ("fraction", "max_new_tokens", "temperature", "top_p", "stop_on_eos", "prompt_tokens", "sync_every", "max_staleness")
LM_FIXED_ON_RESUME = ("task", *(f"data.{f}" for f in LM_ROW_FIELDS), "data.in_memory_tokens", "distill.beta", "distill.top_k",
                      *(f"onpolicy.{f}" for f in ROLLOUT_FIELDS))


def fingerprint(spec: JobSpec, train_rows: int) -> dict[str, Any]:
    """The fields a resume must not change, as JSON-ready values (plus the number of training
    rows: the same path holding other data is a different run)."""
    dumped = spec.model_dump(mode="json")
    out: dict[str, Any] = {"data.train_rows": train_rows}
    for key in FIXED_ON_RESUME + (LM_FIXED_ON_RESUME if spec.task == "causal_lm" else ()):
        node: Any = dumped
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    out["distill"] = {k: dumped["distill"][k] for k in DISTILL_FIXED}
    cache = spec.teacher.cache if spec.teacher is not None and spec.teacher.cached else None
    if cache is not None and cache.format == "topk":
        # A top-k cache changes the loss. Full logits train as the live pool does, so a run may
        # switch between online and a full cache when it resumes (and older checkpoints, which
        # lack this key, still match).
        out["teacher.outputs"] = f"top-{cache.k} {cache.value_dtype}"
    return out


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
