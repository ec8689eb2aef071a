"""Errors a user can cause. The CLI prints them as one line and exits 2, with no traceback."""

from __future__ import annotations

import re
import reprlib
import traceback
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# The most of a user's value a message echoes back, and the most a whole line may hold: a YAML
# file of nested aliases (a "billion laughs") or a range of a million world sizes must not become
# a line of megabytes.
SHOWN_CHARS = 200
LINE_CHARS = 2000

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN_CHARS


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """A user's value as a message quotes it: its repr, never longer than `limit` characters
    (reprlib stops early, so a huge nested value costs no more than a small one to show)."""
    return clip(_REPR.repr(value), limit)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 5] + "[...]"


class UserError(Exception):
    """A mistake in the job file, its overrides or the files it names.

    `field` is the dotted job-file path the user must change ("train.global_batch_size"),
    `message` says what is wrong and how to fix it.
    """

    exit_code = 2

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):
        # Raised in a Ray task or a train worker, it crosses to the driver pickled: rebuild it
        # from its two parts (Exception's default would call it with the joined line alone).
        return type(self), (self.field, self.message)

    def line(self) -> str:
        """The error as the CLI prints it: one line, bounded, even when the message quotes a
        user's exception that spans several lines."""
        return clip(" ".join(part.strip() for part in str(self).splitlines() if part.strip()), LINE_CHARS)


def user_error_in(e: BaseException) -> UserError | None:
    """The UserError a run's failure comes from, if any: a data check raised where the data is
    read (a Ray Data task, a train worker) reaches the driver wrapped by Ray (a task error, a
    worker group's failures by rank, the chain of causes)."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, UserError):
            return UserError(err.field, err.message)  # the plain error, not Ray's subclass of it
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [failures[r] for r in sorted(failures)]
        todo += [getattr(err, "cause", None), err.__cause__, err.__context__]
    return _user_error_in_text(e)


# A UserError as a traceback's last line shows it. Ray Data wraps what an actor's UDF raises in a
# UserCodeException, which crosses to the driver without its cause: only the traceback's text
# still holds the user's error.
_USER_LINE = re.compile(r"^(?:kd_ray\.core\.errors\.)?UserError: ([^\s:]+): (.+)$", re.MULTILINE)


def _user_error_in_text(e: BaseException) -> UserError | None:
    found = _USER_LINE.findall(_ANSI.sub("", str(e)))
    return UserError(*found[-1]) if found else None


def raise_users(e: BaseException) -> None:
    """Raise the user's mistake a failure comes from (user_error_in) as a plain UserError, its
    one line without Ray's wrappers and their tracebacks; return if it is not the user's."""
    found = user_error_in(e)
    if found is not None:
        raise found from None


def as_users(make: Callable[[], T]) -> T:
    """make(), a user's mistake raised inside it (in a Ray task or actor too) as its plain UserError."""
    try:
        return make()
    except Exception as e:
        raise_users(e)
        raise


class Failed(Exception):
    """A run or a capture that started and then failed for a reason only running it revealed:
    `what` ("run", "cache") failed, the message says why in one line. Exit 1."""

    exit_code = 1

    def __init__(self, what: str, why: str):
        super().__init__(why)
        self.what = what


# Python's words between the exceptions of a chain, the cause printed first.
_CHAIN = re.compile(r"^(The above exception was the direct cause of the following exception:"
                    r"|During handling of the above exception, another exception occurred:)$", re.M)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's own wrappers around a task's or a worker's error: what they say ("UDF failed to process a
# data block") is never what the user can act on; the exception they wrap is.
_WRAPPERS = ("ray.exceptions.", "ray.train.", "ray.data.")


def reason(e: BaseException) -> str:
    """Why a run failed, on one line: the message of the user's exception (not of the wrappers
    Ray puts around it when it crosses a task, an actor or the worker group), from the lowest
    failed rank."""
    failures = getattr(e, "worker_failures", None)  # ray.train.WorkerGroupError: by rank
    if isinstance(failures, dict) and failures:
        e = failures[min(failures)]
    text = _ANSI.sub("", str(e))
    if not (_CHAIN.search(text) or "Traceback (most recent call last)" in text or "\n  File " in text):
        # A bare exception (Ray keeps a train function's own exception as it was raised): its
        # type and its whole message, on one line.
        lines = traceback.format_exception_only(type(e), e)
        return " ".join(ln.strip() for part in lines for ln in part.splitlines() if ln.strip())
    last = ""
    for part in reversed(_CHAIN.split(text)):
        lines = [ln.strip() for ln in part.splitlines() if ln.strip() and not ln.strip().startswith(("File ", "Traceback", "^", "~"))]
        if not lines or _CHAIN.match(lines[-1]):
            continue
        last = last or lines[-1]
        if not lines[-1].startswith(_WRAPPERS):
            return lines[-1]
    return last or type(e).__name__
