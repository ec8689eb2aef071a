"""Resolve a model name from a job file to a factory, and build it.

Three kinds of names, tried in this order:
  - an import path `package.module:callable` (the job file's directory is importable, so a
    `models.py` next to the job file works: `models:my_net`);
  - a built-in model of `kd_ray.models` (`mlp`, `convnet`);
  - a torchvision model name (`resnet18`, `resnet50`, ...).
"""

from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from kd_ray.core.imports import ModelNameError, import_callable
from kd_ray.models import BUILTINS


def _torchvision_names() -> list[str]:
    import torchvision.models

    return list(torchvision.models.list_models())


def resolve(name: str, job_dir: str | None = None) -> Callable[..., nn.Module]:
    if ":" in name:
        return import_callable(name, job_dir)
    if name in BUILTINS:
        return BUILTINS[name]
    tv = _torchvision_names()
    if name in tv:
        import torchvision.models

        return lambda **kw: torchvision.models.get_model(name, **kw)
    hint = difflib.get_close_matches(name, list(BUILTINS) + tv, n=1)
    suffix = f"did you mean '{hint[0]}'? " if hint else ""
    raise ModelNameError(
        f"unknown model '{name}': {suffix}use a built-in ({', '.join(BUILTINS)}), a torchvision "
        f"model name, or an import path 'package.module:callable'"
    )


def build_model(name: str, kwargs: dict | None = None, job_dir: str | None = None) -> nn.Module:
    factory = resolve(name, job_dir)
    model = factory(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ModelNameError(f"'{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
