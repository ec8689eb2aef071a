"""Where files live: a local path, or a URI of any filesystem pyarrow opens (file://, s3://, gs://).

The one place that decides whether a path is remote, that opens a filesystem for it, and that
knows what object storage cannot do as a disk does (no rename of a directory, no append).

A URI takes what pyarrow takes: `s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http` for
an S3-compatible server, credentials from the environment (AWS_ACCESS_KEY_ID ...), an instance
profile or a GCS service account. The query stays at the end of every path made from it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from typing import Iterator

from kd_ray.core.errors import UserError

# Where Ray unpacks a job's --working-dir on the node that runs it: under the session directory,
# which goes with the cluster (and git-ignored files were never uploaded to it).
RAY_WORKING_DIR_COPY = ("runtime_resources", "working_dir_files")
# Credentials and endpoints a driver holds that a cluster's workers need for the same bucket; a
# cluster's nodes usually have their own (an instance profile), and then nothing is forwarded.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
                  "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")


def is_remote(path: str) -> bool:
    """A URI (`s3://bucket/key`, `file:///dir`), as opposed to a path on this machine."""
    return "://" in path


def _split(path: str) -> tuple[str, str]:
    """(path, "?query" or "") of a URI; a local path has no query."""
    if is_remote(path) and "?" in path:
        base, query = path.split("?", 1)
        return base, "?" + query
    return path, ""


def join(path: str, *parts: str) -> str:
    """path/part/...: a URI keeps its query (the endpoint) at the end."""
    if not is_remote(path):
        return os.path.join(path, *parts)
    base, query = _split(path)
    return "/".join([base.rstrip("/"), *parts]) + query


def with_suffix(path: str, suffix: str) -> str:
    """path + suffix (a sibling of the file or directory): a URI keeps its query at the end."""
    base, query = _split(path)
    return base.rstrip("/") + suffix + query


def basename(path: str) -> str:
    return os.path.basename(_split(path)[0].rstrip("/"))


def shown(path: str) -> str:
    """A path as a message names it: a URI without its query."""
    return _split(path)[0]


def need_file(path: str, field: str, fix: str) -> None:
    """A local path that must name a file: missing and a directory are different mistakes."""
    if os.path.isdir(path):
        raise UserError(field, f"{path} is a directory, not a file; {fix}")
    if not os.path.isfile(path):
        raise UserError(field, f"{path} does not exist; {fix}")


# How long kd_ray waits for a storage endpoint: pyarrow's GCS client retries for 15 minutes by
# default, and a bucket that does not answer must become one line naming the field, not a hang.
GCS_RETRY_SECONDS = 10
CONTACT_SECONDS = 30


def _with_deadline(uri: str) -> str:
    """A gs:// URI with a retry limit, unless the user gave one (the query pyarrow reads)."""
    if uri.split("://", 1)[0].lower() not in ("gs", "gcs") or "retry_limit_seconds=" in uri:
        return uri
    return uri + ("&" if "?" in uri else "?") + f"retry_limit_seconds={GCS_RETRY_SECONDS}"


def filesystem(path: str):
    """(pyarrow filesystem, path within it) for a local path or a URI; no trailing slash."""
    import pyarrow.fs as pafs

    if is_remote(path):
        fs, root = pafs.FileSystem.from_uri(_with_deadline(path))
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
    return fs, root.rstrip("/")


def listdir(path: str, dirs_only: bool = False) -> list[str]:
    """The names directly under a directory or prefix (`dirs_only`: of its directories); [] where
    there is none."""
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return [os.path.basename(i.path) for i in found if not dirs_only or i.type == pafs.FileType.Directory]


def is_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    return fs.get_file_info(root).type == pafs.FileType.Directory


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    return fs.get_file_info(root).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    """A file's bytes; FileNotFoundError where there is none."""
    fs, root = filesystem(path)
    with fs.open_input_stream(root) as f:
        return f.read()


# The name a file or directory is written under before it is renamed into place: a name no reader
# takes for the real one (a cache's leftovers of a killed capture are found by it).
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def replaced(path: str, keep_existing: bool = False) -> Iterator[str]:
    """A temporary local path beside `path`, for the caller to write a file or a directory at,
    renamed onto `path` when the block ends: no reader ever sees it half-written, and a write cut
    off (an error, a killed process) leaves the old `path` whole. With `keep_existing`, a `path`
    that appeared meanwhile (several writers of the same content) is kept and this one dropped.
    The one atomic write of kd_ray: write_bytes and write_whole use it."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
    try:
        yield tmp
        if keep_existing and os.path.exists(path):
            return
        os.replace(tmp, path)
    except OSError:
        if not (keep_existing and os.path.exists(path)):
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def write_whole(fs, path: str, data: bytes) -> None:
    """Write a whole file at `path` of pyarrow filesystem `fs`, that no reader sees half-written:
    locally through `replaced`, on object storage one upload (an object appears whole or not at
    all; a rename there would be a copy)."""
    from pyarrow.fs import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        with replaced(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_bytes(path: str, data: bytes) -> None:
    """write_whole at a local path or a URI."""
    fs, root = filesystem(path)
    write_whole(fs, root, data)


def move(src: str, dest: str) -> None:
    """Move a directory. Object storage has no rename: every object is copied to the new prefix
    first and the old ones deleted after, so an interruption leaves the original whole (and at
    worst a partial copy beside it), never a run lost."""
    if not is_remote(src):
        shutil.move(src, dest)
        return
    import pyarrow.fs as pafs

    fs, root = filesystem(src)
    _, target = filesystem(dest)
    pafs.copy_files(root, target, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(root)


def delete(path: str) -> None:
    """Remove one file (an object); nothing there is fine."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    fs, root = filesystem(path)
    if exists(path):
        fs.delete_file(root)


def delete_dir(path: str) -> None:
    """Remove a directory and everything under it (a prefix, on object storage); nothing there is fine."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, root = filesystem(path)
    if exists(path):
        fs.delete_dir(root)


def copy_out(local_dir: str, dest: str) -> None:
    """Copy a local directory's files to `dest`, a local path or a URI."""
    import pyarrow.fs as pafs

    fs, path = filesystem(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, destination_filesystem=fs)


def put(local_file: str, dest: str) -> None:
    """Copy one local file to `dest`, a local path or a URI."""
    if not is_remote(dest):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.copyfile(local_file, dest)
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(dest)
    pafs.copy_files(local_file, path, destination_filesystem=fs)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding what `path` holds (a file or a directory): the path itself, or a
    temporary download of it, removed on exit."""
    if not is_remote(path):
        yield path
        return
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="kd_ray_") as d:
        local = os.path.join(d, basename(path))
        if fs.get_file_info(root).type == pafs.FileType.Directory:
            os.makedirs(local)
        pafs.copy_files(root, local, source_filesystem=fs)
        yield local


def need_writable_dir(path: str, field: str) -> None:
    """A local directory that exists or can be made, by this user: its nearest existing ancestor
    is a directory they can write in."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(field, f"{existing} is a file, so {path} cannot be a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(field, f"cannot write in {existing} (permission denied); choose a directory you can write in")


# What check_reachable runs in a process of its own: a client stuck on a silent endpoint ends with
# that process at the deadline (in this one, pyarrow would hold the interpreter's exit for minutes
# until its retries gave up). Exit 3: no such bucket; 1: pyarrow's error last on stderr.
_PROBE = """
import sys
import pyarrow.fs as pafs
uri, write = sys.argv[1], sys.argv[2] == "1"
fs, root = pafs.FileSystem.from_uri(uri)
root = root.rstrip("/")
if fs.get_file_info(root.split("/", 1)[0]).type == pafs.FileType.NotFound:
    sys.exit(3)
if write:
    with fs.open_output_stream(root + "/.kd_ray_write_check") as f:
        f.write(b"")
    fs.delete_file(root + "/.kd_ray_write_check")
"""


def check_reachable(path: str, field: str, write: bool = False) -> None:
    """A URI whose filesystem answers (within CONTACT_SECONDS), whose bucket exists and (`write`)
    takes a file, or a UserError naming `field`: the mistakes of a bucket are found before
    anything starts."""
    where = shown(path)
    scheme = path.split("://", 1)[0].lower()
    if scheme in ("http", "https", "ftp"):
        raise UserError(field, f"{where} is a URL, not storage kd_ray reads: download it and give its local path, "
                               "or put it in a bucket (s3://, gs://)")
    if scheme == "file":  # a local path written as a URI: no bucket, the local checks
        local = where.split("://", 1)[1]
        if not local.startswith("/"):
            raise UserError(field, f"{where} is not a local path: a file:// URI names an absolute path (three slashes), "
                            f"e.g. file:///data/runs; or give the path itself")
        if write:
            need_writable_dir(local, field)
        return
    bucket = where.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise UserError(field, f"{where} names no bucket; write {scheme}://BUCKET/PATH")
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, _with_deadline(path), "1" if write else "0"],
                              capture_output=True, text=True, timeout=CONTACT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(field, f"{where}: the storage endpoint did not answer within {CONTACT_SECONDS} s; check the URI (and "
                        "endpoint_override=HOST:PORT in it, or AWS_ENDPOINT_URL), the network and the credentials") from None
    if done.returncode == 3:
        raise UserError(field, f"bucket {bucket} does not exist (or these credentials cannot see it); create it or fix the URI")
    if done.returncode:
        error = next((ln for ln in reversed(done.stderr.splitlines()) if ln.strip()), f"exit {done.returncode}")
        raise UserError(field, f"cannot use {where}: {_why(error.split(': ', 1)[-1])}")


def need_object(uri: str, field: str, fix: str) -> None:
    """A URI that must name something: its storage answers and it is there."""
    check_reachable(uri, field)
    if not exists(uri):
        raise UserError(field, f"{shown(uri)} does not exist; {fix}")


def _why(error: str) -> str:
    """What a user can do about an error of pyarrow's S3 or GCS client."""
    if "NETWORK_CONNECTION" in error or "curlCode" in error:
        return ("the storage endpoint does not answer; check endpoint_override=HOST:PORT (and scheme=http for a server "
                "without TLS) in the URI, or AWS_ENDPOINT_URL")
    if "Retry policy exhausted" in error or "OAuth2 access token" in error:
        return (f"no answer within {GCS_RETRY_SECONDS} s (no Google Cloud credentials found, or the endpoint cannot be "
                "reached); set GOOGLE_APPLICATION_CREDENTIALS or run on a node with a service account, and check the network")
    if any(k in error for k in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403")):
        return ("access denied: check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the node's instance "
                "profile) and that they may read and write this bucket")
    return " ".join(error.split())[:300]


def in_job_working_dir(path: str) -> bool:
    """A local path inside the copy of `--working-dir` that Ray made for a submitted job."""
    if is_remote(path):
        return False
    parts = os.path.realpath(path).split(os.sep)
    n = len(RAY_WORKING_DIR_COPY)
    return any(tuple(parts[i:i + n]) == RAY_WORKING_DIR_COPY for i in range(len(parts)))


def credentials_env() -> dict[str, str]:
    """The credential and endpoint variables of this process, to hand to a cluster's workers."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}
