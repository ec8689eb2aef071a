"""Errors a user can cause. The CLI prints them as one line and exits 2, with no traceback."""

from __future__ import annotations


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
