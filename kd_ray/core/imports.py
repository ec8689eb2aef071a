"""Names a job file gives for code to import (`package.module:callable`, with the job file's own
directory importable), resolved the same way on the driver and in every worker and actor."""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from typing import Any, Callable


class ModelNameError(ValueError):
    """The name cannot be resolved; the message says why and what to write instead."""


def make_importable(job_dir: str | None) -> None:
    """Put the job file's directory on sys.path, in the driver and in every worker and actor."""
    if job_dir and job_dir not in sys.path:
        sys.path.insert(0, job_dir)


def import_callable(name: str, job_dir: str | None = None) -> Callable[..., Any]:
    """`package.module:callable` -> the callable (the job file's directory is importable)."""
    module_name, _, attr = name.partition(":")
    make_importable(job_dir)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelNameError(
            f"cannot import module '{module_name}' ({e}); put {module_name}.py next to the "
            f"job file or install the package that provides it"
        ) from None
    except (Exception, SystemExit) as e:  # the user's module itself fails on import: SyntaxError, any error, sys.exit()
        what = f"calls sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"failed: {type(e).__name__}: {e}"
        raise ModelNameError(f"importing module '{module_name}' {what}; fix {module_name}.py") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        options = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        hint = difflib.get_close_matches(attr, options, n=1)
        suffix = f"; did you mean '{module_name}:{hint[0]}'?" if hint else ""
        raise ModelNameError(f"module '{module_name}' has no callable '{attr}'{suffix}")
    return factory


def check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict) -> None:
    """Reject keyword arguments a factory (a model's, a callback's) cannot take, before any work starts."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        accepted = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
        raise ModelNameError(f"'{name}' does not accept these kwargs ({e}); it takes: {', '.join(accepted)}") from None
