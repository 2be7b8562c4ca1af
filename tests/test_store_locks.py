"""The writer lock on filelock: one writer per (run, rank), interoperable with chrono versions
that took the same flock with fcntl directly, released from any thread, naming its holder."""
import fcntl
import os
import socket
import threading

import filelock
import pytest

import chrono
from chrono.store import StoreError, meta_dir
from chrono.store import locks


def _raw_flock(path):
    """What an older chrono (fcntl directly) did to hold or probe a writer lock; None when held."""
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def test_lock_is_the_same_file_and_flock_an_older_chrono_uses(store_root):
    path = meta_dir(store_root, "r") / ".writer-0.lock"
    with chrono.open_run(store_root, "r"):
        assert locks.lock_path(meta_dir(store_root, "r"), 0) == path
        assert path.read_text() == f"{os.getpid()}@{socket.gethostname()}\n"
        assert _raw_flock(path) is None             # an older writer of this run is refused
    old = _raw_flock(path)
    assert old is not None                          # released on close
    try:
        with pytest.raises(StoreError, match=r"run 'r' \(rank 0\) is already being written"):
            chrono.open_run(store_root, "r")        # ... and an older writer's lock refuses us
        with chrono.open_run(store_root, "r", rank=1, world_size=2):
            pass                                    # another rank is another lock
    finally:
        old.close()
    with chrono.open_run(store_root, "r"):
        pass


def test_close_from_another_thread_releases_the_lock(store_root):
    """Probes close their writer from whichever thread detaches; the lock must not be per thread."""
    w = chrono.open_run(store_root, "r")
    t = threading.Thread(target=w.close)
    t.start()
    t.join()
    with chrono.open_run(store_root, "r"):
        pass


def test_dropped_writer_releases_the_lock(store_root):
    """A writer garbage-collected without close() frees the run (as the plain file object did)."""
    import gc

    w = chrono.open_run(store_root, "r")
    del w
    gc.collect()
    with chrono.open_run(store_root, "r"):
        pass


def test_try_lock_and_holder(store_root):
    path = meta_dir(store_root, "r") / ".writer-3.lock"
    with chrono.open_run(store_root, "r", rank=3, world_size=4):
        assert locks.try_lock(path) is None
        assert locks.holder(path) == f"{os.getpid()}@{socket.gethostname()}"
        assert locks.is_lock_name(path.name) and not locks.is_lock_name("manifest.json")
    lock = locks.try_lock(path)
    assert lock is not None
    try:
        with pytest.raises(StoreError, match="already being written"):
            chrono.open_run(store_root, "r", rank=3, world_size=4)
    finally:
        lock.release()
    assert locks.holder(store_root / "missing.lock") == ""


@pytest.mark.skipif(tuple(int(x) for x in filelock.__version__.split(".")[:2]) < (4, 3),
                    reason="filelock < 4.3 empties a lock file on every attempt (chrono.store.locks)")
def test_a_refused_writer_leaves_the_holder_named(store_root):
    path = meta_dir(store_root, "r") / ".writer-0.lock"
    with chrono.open_run(store_root, "r"):
        with pytest.raises(StoreError):
            chrono.open_run(store_root, "r")
        assert locks.holder(path) == f"{os.getpid()}@{socket.gethostname()}"


def _rm_module():
    from chrono_cli.commands import rm

    return rm


def test_rm_lock_holding_refuses_a_busy_run_and_frees_every_lock(store_root, monkeypatch):
    rm = _rm_module()
    with chrono.open_run(store_root, "r", rank=1, world_size=2):
        with chrono.open_run(store_root, "r"):
            pass                                     # rank 0's lock file exists, free
        with pytest.raises(StoreError, match=rf"run 'r' is being written by {os.getpid()}@.*"
                                             r"\(\.writer-1\.lock held\).*nothing was deleted"):
            with rm.hold_writer_locks(store_root, "r"):
                pytest.fail("entered while rank 1 is being written")
        with chrono.open_run(store_root, "r"):       # rank 0's lock was let go after the refusal
            pass
    with rm.hold_writer_locks(store_root, "r"):      # nobody writes: every lock is held by rm ...
        for rank in (0, 1):
            with pytest.raises(StoreError, match="already being written"):
                chrono.open_run(store_root, "r", rank=rank, world_size=2)
    with chrono.open_run(store_root, "r"):           # ... and released after
        pass

    def no_permission(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(locks, "try_lock", no_permission)
    with pytest.raises(StoreError, match=r"cannot take .*\.writer-0\.lock \(Permission denied\); "
                                         r"nothing was deleted"):
        with rm.hold_writer_locks(store_root, "r"):
            pass
