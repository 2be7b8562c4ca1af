"""Background writer thread: turns host arrays into Arrow batches and Parquet parts.

The training thread enqueues closures and gets a ticket per job (``ticket.wait()``);
the handle waits for a window's ticket when the next step ends (durability: a crash
loses at most one flush interval), and ``h.flush()`` and detach wait for everything queued. The queue is bounded
(jobs submitted outside a window close, e.g. ``record_decisions``); a job that
does not fit is dropped and its rows counted in ``rows_dropped``, as are the rows of a
window whose rows could not be built (``Sink.submit_window``). Every
failure is counted and logged once per kind; nothing raises into the caller.
"""
from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger("probes")


class BackgroundWriter:
    def __init__(self, writer, max_jobs: int = 256):
        self.writer = writer
        self.errors = 0
        self.rows_dropped = 0
        self.last_error: str | None = None
        self._logged: set[str] = set()
        self._q: queue.Queue = queue.Queue(maxsize=max_jobs)
        self._thread = threading.Thread(target=self._run, name="probes-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, job, rows=0) -> threading.Event:
        """Queue ``job(writer)``; returns its ticket, an event set once the job ran (failed
        jobs too). A job that cannot be queued is dropped, its ``rows`` (an int, or a
        callable giving it) counted, and its ticket is set at once."""
        done = threading.Event()
        if not self._closed:
            try:
                self._q.put_nowait((job, done))
                return done
            except queue.Full:
                self._fault(RuntimeError("telemetry queue full; dropping a batch (disk slower than training)"))
        self.count_dropped(rows)
        done.set()
        return done

    def count_dropped(self, rows) -> None:
        """Count ``rows`` (an int, or a callable giving it) as dropped: a job that could not be
        queued, or one that failed before any of its rows reached the writer. A count that
        cannot be computed (the job's data is what failed) is not added."""
        try:
            self.rows_dropped += rows() if callable(rows) else rows
        except Exception:
            pass

    def _fault(self, e: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        kind = type(e).__name__
        if kind not in self._logged:
            self._logged.add(kind)
            log.error("probes: telemetry write failed (%s); training continues", self.last_error)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                item[0](self.writer)
                self.writer.flush()
            except Exception as e:  # a telemetry fault never reaches training
                self._fault(e)
            finally:
                if item is not None:
                    item[1].set()
                self._q.task_done()

    def wait(self) -> None:
        """Block until every queued job is written (``h.flush()`` / detach)."""
        if self._thread.is_alive():
            self._q.join()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
