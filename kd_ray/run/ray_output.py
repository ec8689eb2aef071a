"""Ray's own output kept off a run's console (`--verbose` keeps it on), in Ray's session logs.

What Ray prints in the driver of a normal run is nothing a user of kd_ray can act on:

    deprecation warnings   Python warnings about Ray's own calls (RayDeprecationWarning)
    C++ log lines          the driver's core worker writes its error lines to the process's stderr
                           (fd 2) besides its python-core-driver-*.log ("... has constructor arguments
                           in the object store ...")
    raylet lines           messages of the cluster the driver prints as "(raylet) ..." (the worker
                           pool's "... worker processes have been started ... the maximum expected
                           startup concurrency"); also in the raylet's own log

All three go to LOGS/kd_ray_driver_PID.log instead. Python's sys.stderr stays on the console, so
kd_ray's errors and an internal bug's traceback still show; so do other warnings. A worker that
fails is reported by kd_ray itself (kd_ray.run.console: "worker R failed: ...").
"""

from __future__ import annotations

import io
import os
import re
import sys
import warnings

# Ray's prefix of a line it prints for the cluster, possibly coloured.
RAY_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|autoscaler)\)")


class RayLinesApart(io.TextIOBase):
    """A text stream that passes every line on to `console` but Ray's own, which go to `side`."""

    def __init__(self, console, side):
        self.console, self.side, self.partial = console, side, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            (self.side if RAY_LINE.match(line) else self.console).write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.partial:
            self.console.write(self.partial)
            self.partial = ""
        self.console.flush()
        self.side.flush()

    def fileno(self) -> int:
        return self.console.fileno()

    def isatty(self) -> bool:
        return self.console.isatty()

    @property
    def encoding(self):
        return self.console.encoding


def hold_back(logs_dir: str) -> str:
    """From now on, keep Ray's output of this process off the console; returns where it goes."""
    from ray.util.annotations import RayDeprecationWarning

    path = os.path.join(logs_dir, f"kd_ray_driver_{os.getpid()}.log")
    side = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RayDeprecationWarning):
            side.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    # fd 2 (native writes) to the side log; Python's sys.stderr to a copy of the console's.
    sys.stderr.flush()
    console_err = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace")
    os.dup2(side.fileno(), 2)
    sys.stderr = console_err
    sys.stdout = RayLinesApart(sys.stdout, side)
    return path
