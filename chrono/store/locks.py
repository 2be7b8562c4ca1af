"""Writer locks: one writer per (run, rank), an advisory lock on ``<meta dir>/.writer-<rank>.lock``.

The lock is ``filelock.FileLock`` (``flock`` on Unix), taken without waiting:
a second writer of the same run and rank, ``chrono rm`` and ``chrono migrate``
are refused at once instead of queueing. The kernel drops an ``flock`` when its
process dies, so a crashed run can be reopened at once. Chrono versions before
filelock took the same ``flock`` on the same path with ``fcntl`` directly, so
old and new processes exclude each other.

The file's text is the holder's ``pid@host`` (written after the lock is
taken), so a refusal can name the process to stop. filelock before 4.3 empties
the file on every attempt, also a refused one: read the holder before trying
(``holder``), and expect no name when an earlier attempt emptied it.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

_PREFIX, _SUFFIX = ".writer-", ".lock"


def lock_path(meta: Path, rank: int) -> Path:
    """The lock file of writer rank ``rank`` in metadata directory ``meta``."""
    return Path(meta) / f"{_PREFIX}{int(rank)}{_SUFFIX}"


def is_lock_name(name: str) -> bool:
    """Whether a file name is a writer lock (``.writer-<rank>.lock``)."""
    return name.startswith(_PREFIX) and name.endswith(_SUFFIX)


def try_lock(path):
    """Take the lock on ``path`` (created if missing) without waiting.

    Returns the held ``filelock.FileLock`` (call ``release()`` when done; it may
    be released from any thread), or None when another holder has it. Raises
    ``OSError`` when the file cannot be opened (missing directory, permissions).
    """
    import filelock   # ~30 ms; only writers and rm/migrate need it

    lock = filelock.FileLock(os.fspath(path), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        return None
    return lock


def write_holder(path) -> None:
    """Record this process as the holder (``pid@host``) in the lock file it holds."""
    with open(path, "w") as f:
        f.write(f"{os.getpid()}@{socket.gethostname()}\n")


def holder(path) -> str:
    """The ``pid@host`` text a lock file holds; ``""`` when empty or unreadable."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""
