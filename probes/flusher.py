"""Background writer thread: turns host arrays into Arrow batches and Parquet parts.

The training thread enqueues closures; the Handle then waits for a window's
write at window close (durability: a crash loses at most one flush interval),
and ``h.flush()`` and detach wait for everything queued. The queue is bounded
(jobs submitted outside a window close, e.g. ``record_decisions``); a job that
does not fit is dropped and its rows counted in ``rows_dropped``. Every
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

    def submit(self, job, rows: int = 0) -> bool:
        """Queue ``job(writer)``; returns False (and counts ``rows`` dropped) if it cannot."""
        if self._closed:
            self.rows_dropped += rows
            return False
        try:
            self._q.put_nowait(job)
            return True
        except queue.Full:
            self.rows_dropped += rows
            self._fault(RuntimeError("telemetry queue full; dropping a batch (disk slower than training)"))
            return False

    def _fault(self, e: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        kind = type(e).__name__
        if kind not in self._logged:
            self._logged.add(kind)
            log.error("probes: telemetry write failed (%s); training continues", self.last_error)

    def _run(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                job(self.writer)
                self.writer.flush()
            except Exception as e:  # a telemetry fault never reaches training
                self._fault(e)
            finally:
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
