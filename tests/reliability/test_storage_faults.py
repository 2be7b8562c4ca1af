"""Storage faults under a writer with on_error="count" (what probes use): no raise, the
error is counted and logged once, rows stay buffered, and the writer recovers when the
fault clears. Tests run as root in CI containers, where chmod does not block writes,
so most faults are injected by patching the store's I/O calls."""
from __future__ import annotations

import errno
import logging
import os
import shutil

import numpy as np
import pytest

import chrono
import chrono.store.writer as store_writer
from chrono.store import delete_run, meta_dir, table_dir

ROWS = 8  # routing rows per logged step below


def _log(w, step):
    w.log_routing(step, np.arange(2), np.ones((2, 4)))
    w.log_signal(step, "loss", 1.0)


def _steps(root, run="r"):
    con = chrono.connect(root)
    return dict(con.execute("SELECT step, count(*) FROM routing WHERE run_id = ? GROUP BY step",
                            [run]).fetchall())


def _errors_logged(caplog):
    return [r for r in caplog.records if r.name == "chrono.store" and r.levelno >= logging.ERROR]


def _fail_with(monkeypatch, target, name, err, partial=False):
    """Make ``target.name`` raise ``err`` while state["on"]; with ``partial`` it first writes
    half a file to its destination (like a disk filling up mid-write)."""
    real = getattr(target, name)
    state = {"on": True, "calls": 0}

    def fake(*a, **k):
        if state["on"]:
            state["calls"] += 1
            if partial:
                with open(a[1], "wb") as f:
                    f.write(b"PAR1" + b"\0" * 100)
            raise err
        return real(*a, **k)

    monkeypatch.setattr(target, name, fake)
    return state


FAULTS = {
    # (module to patch, function, error, leave a half-written temp file)
    "disk_full": (lambda: store_writer.pq, "write_table", OSError(errno.ENOSPC, "No space left on device"), True),
    "read_only_fs": (lambda: store_writer.pq, "write_table", OSError(errno.EROFS, "Read-only file system"), False),
    "permission_denied": (lambda: store_writer.os, "replace", PermissionError(errno.EACCES, "Permission denied"),
                          False),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_counted_logged_once_and_recovered(store_root, monkeypatch, caplog, fault):
    target, name, err, partial = FAULTS[fault]
    caplog.set_level(logging.WARNING, logger="chrono.store")
    with chrono.open_run(store_root, "r", on_error="count") as w:
        _log(w, 0)
        assert w.flush() == ROWS + 1
        state = _fail_with(monkeypatch, target(), name, err, partial)
        for step in (1, 2, 3):  # three flushes during the fault: none raises
            _log(w, step)
            assert w.flush() == 0
        assert state["calls"] >= 3
        assert w.stats.write_errors == state["calls"]
        assert err.strerror in w.stats.last_error
        assert len(_errors_logged(caplog)) == 1  # logged once, not once per flush
        assert w.pending_rows() == 3 * (ROWS + 1)  # nothing dropped, still buffered
        assert not [p for p in store_root.rglob("*.tmp")]  # no temp file left behind
        assert _steps(store_root) == {0: ROWS}  # readers see only complete parts
        state["on"] = False  # the fault clears
        _log(w, 4)
        assert w.flush() == 4 * (ROWS + 1)
    assert _steps(store_root) == {s: ROWS for s in range(5)}
    con = chrono.connect(store_root)
    assert con.sql("SELECT count(*) FROM signals").fetchall() == [(5,)]


def test_on_error_raise_is_the_default_for_direct_users(store_root, monkeypatch):
    with chrono.open_run(store_root, "r") as w:
        _log(w, 0)
        state = _fail_with(monkeypatch, store_writer.pq, "write_table", OSError(errno.ENOSPC, "full"))
        with pytest.raises(OSError):
            w.flush()
        state["on"] = False


def test_persistent_fault_bounds_memory_and_counts_dropped_rows(store_root, monkeypatch):
    with chrono.open_run(store_root, "r", on_error="count", max_pending_rows=20) as w:
        state = _fail_with(monkeypatch, store_writer.pq, "write_table", OSError(errno.ENOSPC, "full"))
        for step in range(10):
            _log(w, step)
            w.flush()
        assert w._buffers["routing"].rows == 20  # bounded
        assert w.stats.rows_dropped == 10 * ROWS - 20  # and every dropped row is counted
        state["on"] = False
        w.flush()
    # the newest rows are the ones kept
    assert _steps(store_root) == {s: ROWS for s in (8, 9)} | {7: 4}


def test_run_directory_deleted_under_running_writer(store_root, caplog):
    caplog.set_level(logging.WARNING, logger="chrono.store")
    with chrono.open_run(store_root, "r", on_error="count") as w:
        _log(w, 0)
        w.flush()
        delete_run(store_root, "r")   # metadata directory and every table partition
        _log(w, 1)
        assert w.flush() == ROWS + 1
        # visible to readers at once, before close(): the manifest was rewritten
        assert _steps(store_root) == {1: ROWS}
        assert w.stats.write_errors == 0
    assert any("manifest" in r.getMessage() for r in caplog.records)


def test_whole_root_deleted_under_running_writer(store_root):
    with chrono.open_run(store_root, "r", on_error="count") as w:
        _log(w, 0)
        w.flush()
        shutil.rmtree(store_root)
        _log(w, 1)
        w.flush()
        assert _steps(store_root) == {1: ROWS}


def test_run_directory_replaced_by_a_file_then_restored(store_root, caplog):
    """A real (unmocked) fault: the run path stops being a directory, then comes back."""
    caplog.set_level(logging.WARNING, logger="chrono.store")
    with chrono.open_run(store_root, "r", on_error="count") as w:
        _log(w, 0)
        w.flush()
        delete_run(store_root, "r")
        run_paths = [meta_dir(store_root, "r")] + [table_dir(store_root, t, "r") for t in ("routing", "signals")]
        for p in run_paths:
            p.write_text("not a directory")
        for step in (1, 2):
            _log(w, step)
            assert w.flush() == 0  # no raise
        assert w.stats.write_errors >= 2
        assert len(_errors_logged(caplog)) <= 2  # one per kind of error, not per flush
        for p in run_paths:
            os.unlink(p)  # the fault clears
        _log(w, 3)
        assert w.flush() == 3 * (ROWS + 1)
    assert _steps(store_root) == {s: ROWS for s in (1, 2, 3)}


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; "
                    "the mocked permission_denied case above covers it")
def test_real_read_only_directory(store_root, caplog):
    with chrono.open_run(store_root, "r", on_error="count") as w:
        _log(w, 0)
        w.flush()
        os.chmod(table_dir(store_root, "routing", "r"), 0o500)
        try:
            _log(w, 1)
            w.flush()
            assert w.stats.write_errors >= 1
        finally:
            os.chmod(table_dir(store_root, "routing", "r"), 0o700)
        assert w.flush() >= ROWS
    assert _steps(store_root) == {0: ROWS, 1: ROWS}
