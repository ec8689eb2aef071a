"""Contact with an endpoint a job names (a Ray cluster, an MLflow server): tried once with a
deadline, so an address nobody answers on is one line naming its field, never minutes of a
client's retries."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def unanswered(host: str, port: int, seconds: float) -> str | None:
    """Why nothing takes a TCP connection at host:port within `seconds`, or None if something does."""
    try:
        socket.create_connection((host, port), timeout=seconds).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        return f"{why}, within {seconds:g} s"
    return None


def url_endpoint(url: str) -> tuple[str, int] | None:
    """(host, port) of an http(s) URL, or None for anything else (a directory, a database URI)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return None
