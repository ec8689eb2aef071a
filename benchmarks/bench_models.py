"""The benchmark's teacher and student, in plain torch (no kd_ray import).

One file serves every mode: the plain-torch modes import it from benchmarks/, and the kd_ray
mode copies it next to the generated job file and names the factories as `bench_models:teacher`
and `bench_models:student` (a job file's directory is importable), so all modes train exactly
the same architectures.

When a file named THREADS_PROBE sits next to this module (the benchmark creates one in its job
directory), every factory call appends {pid, role, torch threads, OMP_NUM_THREADS} to it: that is
how the benchmark learns how many intra-op threads kd_ray's Ray workers and actors really use.
With FORWARD_PROBE there too, each model's forward calls are timed by hooks (which leave the
state dict alone) into forward_ROLE_PID.log: "start end batch training" per call, wall clock.
The benchmark uses that timeline to see what kd_ray's teacher actor does while the student trains.
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
_PROBE = os.path.join(_HERE, "THREADS_PROBE")
_FORWARD_PROBE = os.path.join(_HERE, "FORWARD_PROBE")


def convnet(in_channels: int = 3, num_classes: int = 10, width: int = 32, blocks: int = 2) -> nn.Module:
    """A VGG-style conv net: per block two 3x3 conv-BN-ReLU, then 2x2 max-pool; global pooling."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(blocks):
        out = width * (2**i)
        layers += [
            nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
            nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
        ]
        if i < blocks - 1:
            layers.append(nn.MaxPool2d(2))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def mlp(in_features: int, num_classes: int = 10, width: int = 128, blocks: int = 2) -> nn.Module:
    """`blocks` hidden Linear-ReLU layers of `width`, then the classifier; blocks=0 is one linear layer."""
    layers: list[nn.Module] = []
    features = in_features
    for _ in range(blocks):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def build(arch: str, num_classes: int, in_channels: int = 3, width: int = 32, blocks: int = 2) -> nn.Module:
    if arch == "convnet":
        return convnet(in_channels=in_channels, num_classes=num_classes, width=width, blocks=blocks)
    if arch == "mlp":  # on flat samples of `in_channels` features
        return mlp(in_features=in_channels, num_classes=num_classes, width=width, blocks=blocks)
    import torchvision.models

    return torchvision.models.get_model(arch, num_classes=num_classes)  # resnet50, resnet18, ...


def _probe(role: str) -> None:
    if not os.path.exists(_PROBE):
        return
    line = {"pid": os.getpid(), "role": role, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    with open(_PROBE, "a") as f:
        f.write(json.dumps(line) + "\n")


def _time_forwards(model: nn.Module, role: str) -> nn.Module:
    if not os.path.exists(_FORWARD_PROBE):
        return model
    path = os.path.join(_HERE, f"forward_{role}_{os.getpid()}.log")
    started: list[float] = [0.0]

    def pre(module, args):
        started[0] = time.time()

    def post(module, args, out):
        n = len(args[0]) if args and hasattr(args[0], "__len__") else 0
        with open(path, "a") as f:
            f.write(f"{started[0]:.6f} {time.time():.6f} {n} {int(module.training)}\n")

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    return model


def teacher(arch: str = "convnet", num_classes: int = 10, in_channels: int = 3, width: int = 32, blocks: int = 2) -> nn.Module:
    _probe("teacher")
    return _time_forwards(build(arch, num_classes, in_channels, width, blocks), "teacher")


def student(arch: str = "convnet", num_classes: int = 10, in_channels: int = 3, width: int = 16, blocks: int = 2) -> nn.Module:
    _probe("student")
    return _time_forwards(build(arch, num_classes, in_channels, width, blocks), "student")
