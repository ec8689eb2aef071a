"""The benchmark's workload: presets, model specs, synthetic data, the models, their forward costs.

Plain torch, no kd_ray import: the child processes of modes 1, 2 and kd_step build their models
and batches from here, and `prepare` writes the files that kd_ray's job reads.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from contextlib import nullcontext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# In the order they run. A `_parquet` mode reads the same rows from a parquet copy of the .npz.
MODES = ("student", "reference", "precomputed", "kd_step", "kd_student", "kd_student_parquet", "kd_ray", "kd_ray_parquet", "colocated",
         "cached")


PRESETS = {
    # 2-core CPU: the teacher costs ~14x the student in FLOPs (measured and printed each run).
    "cpu": dict(
        device="cpu", image=[3, 32, 32], classes=10, rows=4096,
        teacher="convnet:width=48,blocks=3", student="convnet:width=16,blocks=2",
        batch_size=64, warmup=16, window_steps=16, windows=5,
        precision="fp32", channels_last=False, compile=False,
        kd_cpus_per_worker=1, kd_cpus_per_actor=1, kd_timeout=600, kd_warmup_steps=64,
    ),
    # A small student, whose step takes about a millisecond: kd_ray's fixed costs per step show.
    # An MLP of 22k parameters on 32 features, a teacher 3.5x its FLOPs, batch 100, 2,000 kd_ray
    # steps; one thread everywhere (a step this small runs no faster on two). No forward hooks:
    # at a millisecond a step, writing a line per forward would be part of what is measured.
    "small": dict(
        device="cpu", image=[32], classes=10, rows=20000,
        teacher="mlp:width=256,blocks=2", student="mlp:width=128,blocks=2",
        batch_size=100, warmup=200, window_steps=200, windows=5,
        precision="fp32", channels_last=False, compile=False, threads=1, forward_probe=False,
        modes="student,reference,precomputed,kd_student,kd_student_parquet,kd_ray,colocated,cached",
        kd_cpus_per_worker=1, kd_cpus_per_actor=1, kd_timeout=600, kd_warmup_steps=1000,
    ),
    # One or more CUDA GPUs: seed 000's anchor workload.
    "gpu": dict(
        device="cuda", image=[3, 224, 224], classes=100, rows=1024,
        teacher="resnet50", student="resnet18",
        batch_size=128, warmup=32, window_steps=16, windows=5,
        precision="bf16", channels_last=True, compile=True,
        kd_cpus_per_worker=4, kd_cpus_per_actor=4, kd_timeout=1800, kd_warmup_steps=192,
    ),
}


# The overhead floor: the small preset with a linear layer on 4 features, a step of almost nothing,
# so what a step costs is the loop's and the stream's fixed cost.
PRESETS["floor"] = {**PRESETS["small"], "image": [4], "teacher": "mlp:width=16,blocks=1", "student": "mlp:blocks=0",
                    "modes": "student,kd_student,kd_student_parquet"}


def parse_model(text: str, image: list[int], classes: int) -> dict:
    """'convnet:width=48,blocks=3' or 'resnet50' -> kwargs of bench_models.teacher/student."""
    arch, _, rest = text.partition(":")
    kwargs: dict = {"arch": arch, "num_classes": classes, "in_channels": image[0]}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = int(value)
    if arch == "mlp":
        kwargs["in_channels"] = image[0]  # flat samples: their feature count
    elif arch != "convnet":
        kwargs.pop("in_channels")  # torchvision models take 3-channel images
    return kwargs


def prepare(cfg: dict, workdir: str, parquet: bool = False) -> None:
    """Synthetic data (train and a small eval split) as .npz (and, for the `_parquet` modes, the
    same rows as parquet), the teacher's weights as safetensors, and the model file next to the job."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(cfg["seed"])
    for name, rows in (("train", cfg["rows"]), ("eval", max(cfg["batch_size"], 64))):
        x = rng.standard_normal((rows, *cfg["image"]), dtype=np.float32)
        y = rng.integers(0, cfg["classes"], rows).astype(np.int64)
        np.savez(os.path.join(workdir, f"{name}.npz"), x=x, y=y)
        if parquet:
            write_parquet(os.path.join(workdir, f"{name}.parquet"), x, y)
    shutil.copy(os.path.join(HERE, "bench_models.py"), workdir)
    sys.path.insert(0, HERE)
    import bench_models

    torch.manual_seed(cfg["seed"] + 1)
    teacher = bench_models.teacher(**cfg["teacher"])
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, os.path.join(workdir, "teacher.safetensors"))


def write_parquet(path: str, x, y, row_group_rows: int = 1000) -> None:
    """Each sample's features as one fixed-size list (flattened), its label as an integer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = x.reshape(len(x), -1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    pq.write_table(pa.table({"x": column, "y": pa.array(y)}), path, row_group_size=row_group_rows)


def amp(precision: str, device):
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_batches(cfg: dict, device) -> list:
    import numpy as np
    import torch

    with np.load(cfg["train_npz"]) as z:
        x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    b = cfg["batch_size"]
    n = len(x) // b
    x, y = x[: n * b].to(device), y[: n * b].to(device)
    if cfg["channels_last"] and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(n)]


def build_models(cfg: dict, device, with_teacher: bool):
    import torch

    # The copy in the work dir, the file kd_ray's job imports, so every mode trains the same models.
    sys.path.insert(0, cfg["models_dir"])
    import bench_models
    from safetensors.torch import load_file

    torch.manual_seed(cfg["seed"])
    student = bench_models.student(**cfg["student"]).to(device)
    teacher = None
    if with_teacher:
        teacher = bench_models.teacher(**cfg["teacher"])
        teacher.load_state_dict(load_file(cfg["teacher_weights"]))
        teacher.eval().requires_grad_(False).to(device)
    if cfg["channels_last"]:
        student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    return student, teacher


def forward_costs(cfg: dict, student, teacher, batch, device) -> dict:
    """FLOPs per sample (torch's FlopCounterMode) and timed eager forward, teacher vs student."""
    out: dict = {}
    student.eval()
    try:
        for name, model in (("teacher", teacher), ("student", student)):
            out.update(_forward_cost(name, model, batch[0], cfg, device))
    finally:
        student.train()
    out["flops_ratio"] = out["teacher_flops_per_sample"] / out["student_flops_per_sample"]
    out["timed_forward_ratio"] = out["teacher_forward_ms"] / out["student_forward_ms"]
    return out


def _forward_cost(name: str, model, x, cfg: dict, device) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), amp(cfg["precision"], device):
        with FlopCounterMode(display=False) as counter:
            model(x[:2])
        times = []
        for i in range(cfg["cost_reps"] + 2):
            sync(device)
            t0 = time.perf_counter()
            model(x)
            sync(device)
            if i >= 2:  # the first two calls pay for allocation and kernel selection
                times.append(time.perf_counter() - t0)
    return {f"{name}_flops_per_sample": counter.get_total_flops() / 2,
            f"{name}_forward_ms": 1e3 * statistics.median(times)}
