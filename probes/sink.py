"""Where a closed window goes: the run's ``RunWriter``, written on the background thread.

``open_writer`` opens the run (or a ``NullWriter`` when the store cannot be written:
training goes on without telemetry on disk); ``first_step`` decides where this
session's steps start; ``Sink`` queues ``WindowJob`` records and controller decisions
to ``probes.flusher.BackgroundWriter``, where ``probes.window.finish`` turns a job into
a ``ClosedWindow`` and ``write_window`` that into writer calls.
"""
from __future__ import annotations

import logging

from chrono.store import StoreError, open_run

from .flusher import BackgroundWriter
from .records import ClosedWindow, WindowJob
from .rows import write_token_rows
from .window import finish, job_rows

log = logging.getLogger("probes")


class NullWriter:
    """Stands in when the run directory cannot be created (read-only, disk full): counts, never raises."""

    def __init__(self, run_id, error):
        from chrono.store import WriterStats
        self.run_id = run_id
        self.stats = WriterStats(write_errors=1, last_error=f"{type(error).__name__}: {error}")

    def __getattr__(self, name):
        if name.startswith("log_") or name in ("flush", "close", "update_manifest", "replace_table",
                                                "declare_experts"):
            def dropped(*a, **k):
                self.stats.write_errors += 1
            return dropped
        raise AttributeError(name)


def open_writer(root, run: str, model_desc: dict, config: dict, dist):
    """The run's writer (``chrono.open_run``), or a ``NullWriter`` on an OSError.

    Raises ``StoreError`` (bad run id, run already being written): the user's to fix.
    """
    try:
        if dist is not None:
            model_desc = dist.model_desc(model_desc)
        return open_run(root, run, model=model_desc, config=config, on_error="count",
                        **(dist.writer_kwargs() if dist is not None else {}))
    except OSError as e:
        log.error("probes: cannot open run %r under %s (%s); training continues without telemetry "
                  "on disk", run, root, e)
        return NullWriter(run, e)


def first_step(writer, start_step, overwrite: bool) -> int:
    """Where this session's steps start: after the run's stored steps, or ``start_step``.

    Raises ``StoreError`` when ``start_step`` would write stored steps again without ``overwrite``.
    """
    stored = getattr(writer, "next_step", 0)   # 0 for a run that could not be opened
    run_id = writer.run_id
    if start_step is None:
        if overwrite and stored:
            log.warning("probes: run %r: overwrite=True without start_step replaces nothing; steps "
                        "continue at %d (pass start_step=0 to replace the whole run)", run_id, stored)
        return stored
    if start_step < stored:
        if not overwrite:
            raise StoreError(
                f"run {run_id!r} already has steps up to {stored - 1} for this rank; "
                f"start_step={start_step} would write them twice. Leave start_step=None to "
                f"continue at {stored}, or pass overwrite=True to replace steps >= {start_step}")
        removed = writer.truncate(start_step)
        log.warning("probes: run %r: removed stored rows of steps >= %d before resuming (%s)",
                    run_id, start_step, ", ".join(f"{t}: {n}" for t, n in removed.items()) or "none")
    return int(start_step)


def write_window(w, cw: ClosedWindow) -> None:
    """All writer calls of one closed window (runs on the background thread)."""
    for layer, n in cw.sizes.items():   # routers that grew or shrank are declared before their rows
        w.declare_experts(layer, n)
    for block in cw.blocks:
        block.write(w)
    if cw.tokens is not None:
        write_token_rows(w, cw.tokens)
    if cw.write_globals and cw.snapshot is not None:
        w.log_rows("snapshots", list(cw.snapshot.rows))
        w.log_rows("alerts", list(cw.snapshot.transitions))
    for s in cw.signals:
        w.log_signal(s.step, s.name, s.value, layer=s.layer)


class Sink:
    """The writer and its background thread. ``wait()`` blocks until everything queued is written."""

    def __init__(self, writer):
        self.writer = writer
        self._bg = BackgroundWriter(writer)

    def submit_window(self, job: WindowJob, routers: list, stage, faults):
        """Queue a closed window: built (``probes.window.finish``) and written on the
        background thread. Returns the ticket (``.wait()``). A window whose rows cannot be built
        is a write error (``write_errors``) and its routing and token rows count as dropped
        (``rows_dropped``), as when the queue is full."""
        def write(w):
            try:
                closed = finish(job, routers, stage, faults)
            except Exception:   # nothing of this window reached the writer
                self._bg.count_dropped(lambda: job_rows(job))
                raise
            write_window(w, closed)

        return self._bg.submit(write, rows=lambda: job_rows(job))

    def submit_decisions(self, rows: list[dict]):
        return self._bg.submit(lambda w: w.log_rows("decisions", rows), rows=len(rows))

    def wait(self) -> None:
        self._bg.wait()

    def close(self) -> None:
        """Stop the thread (after writing what is queued). The writer stays open."""
        self._bg.close()

    def stats(self) -> dict:
        ws, bg = self.writer.stats, self._bg
        return {"rows_written": dict(ws.rows_written), "write_errors": ws.write_errors + bg.errors,
                "rows_dropped": ws.rows_dropped + bg.rows_dropped,
                "last_error": ws.last_error or bg.last_error}
