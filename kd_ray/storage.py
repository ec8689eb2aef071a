"""Where files live: a local path, or a URI of any filesystem pyarrow opens (file://, s3://, gs://).

The one place that decides whether a path is remote, and that opens a filesystem for it.
"""

from __future__ import annotations

import os

from kd_ray.errors import UserError


def is_remote(path: str) -> bool:
    """A URI (`s3://bucket/key`, `file:///dir`), as opposed to a path on this machine."""
    return "://" in path


def need_file(path: str, field: str, fix: str) -> None:
    """A local path that must name a file: missing and a directory are different mistakes."""
    if os.path.isdir(path):
        raise UserError(field, f"{path} is a directory, not a file; {fix}")
    if not os.path.isfile(path):
        raise UserError(field, f"{path} does not exist; {fix}")


def filesystem(path: str):
    """(pyarrow filesystem, path within it) for a local path or a URI; no trailing slash."""
    import pyarrow.fs as pafs

    if is_remote(path):
        fs, root = pafs.FileSystem.from_uri(path)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
    return fs, root.rstrip("/")


def copy_out(local_dir: str, dest: str) -> None:
    """Copy a local directory's files to `dest`, a local path or a URI."""
    import pyarrow.fs as pafs

    fs, path = filesystem(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, destination_filesystem=fs)
