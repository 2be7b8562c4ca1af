"""The ``Handle`` that ``probes.attach`` (``probes.api``) returns: every router of a model hooked, routing recorded.

The ``Handle`` is the public face; the work is done by parts, one concept each:

* ``probes.forwards``: top-level and stack forward hooks, per-thread forward state;
* ``probes.router_hook``: the router forward hook (hot path) -> ``probes.recorder``;
* ``probes.steps`` + ``probes.clock``: the open step and when it ends;
* ``probes.window``: the window's steps, closed into a typed ``ClosedWindow``
  (``probes.records``) at every ``flush_every`` steps: in the training thread, O(1) in
  the window's length, a buffer swap, the window sums, the multi-rank reduction and,
  with ``on_snapshot`` callbacks, ``probes.snapshot_stage`` (snapshot rows, alerts,
  callbacks); the rest on the background thread;
* ``probes.sink``: the run writer; rows, Arrow and Parquet work run on a background thread;
* ``chrono.hooks.HookRegistry``: every hook put on the model, by probes and by actuators
  registered with the handle, unwound last first at detach.

Leaving the ``with`` block (also by exception) or ``h.detach()``: flush, remove every
hook, close the writer. The handle keeps only weak references to the model and its
modules, and the hooks only weak references to the handle.
"""
from __future__ import annotations

import logging
import threading
import weakref

import torch
from torch import nn

from chrono import metrics as M
from chrono.hooks import HookRegistry
from chrono.router_hooks import lens_pre_hook
from chrono.store import default_root

from . import context as C
from .clock import StepClock
from .discovery import RouterSite, describe, find_sites
from .distributed import resolve as resolve_distributed
from .faults import Faults
from .forwards import Forwards
from .interrupts import held_sigint
from .loads import RecorderLoads
from .options import check_options
from .recorder import Recorder, model_device
from .router_hook import router_hook
from .routing import ProbeError
from .sampling import TokenSampler
from .sink import Sink, first_step, open_writer
from .snapshot_stage import SnapshotStage
from .steps import Steps
from .window import Window

log = logging.getLogger("probes")
# attached handles by model (weak key, strong value): a handle lives as long as the model it is
# attached to, until detach, even when the caller does not keep it (``probes.attach(model)`` alone
# records, like a registered hook); the handle holds the model only weakly, so no cycle keeps it
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


class Handle:
    """Returned by ``probes.attach``; a context manager. See the module docstring.

    Public: ``routers`` (``RouterSite`` list), ``run_id``, ``writer`` (the run's
    ``RunWriter``), ``flush_every``, ``hooks`` (``chrono.hooks.HookRegistry``: register
    hooks here to have detach remove them), ``metrics_server``, ``current_step``; methods
    ``step set_mask flush metrics on_snapshot record_decisions latest_snapshot
    latest_expert_counts latest_decisions active_alerts alert_transitions load_cursor
    stats serve_metrics detach``. It satisfies ``chrono.governance.GovernedHandle``,
    ``chrono.router_loads.RouterLoads`` and ``chrono.exporters.live.LiveRouting``.
    """

    def __init__(self, model: nn.Module, run: str, root=None, tokens: float = 0.0,
                 flush_every: int = 50, lenses=None, distributed=None, metrics_port=None,
                 generic: bool = True, specs=None, max_tokens_per_step: int = 4096, seed: int = 0,
                 start_step: int | None = None, overwrite: bool = False, steps: str = "auto",
                 padding: str = "exclude", config: dict | None = None, auto_step: bool | None = None,
                 metrics_expert_labels: bool = False, staging: bool = True):
        tokens = 0.0 if tokens is None else tokens
        if auto_step is False:       # the pre-0.2 spelling of steps="manual"
            steps = "manual"
        self._leader = None
        if isinstance(steps, Handle):   # follow another handle's steps (a frozen reference model)
            if steps._detached:
                raise ProbeError("steps=<handle>: that handle is already detached")
            self._leader, steps = steps, "manual"
            if start_step is None:
                start_step = self._leader.current_step
        check_options(model, flush_every=flush_every, tokens=tokens, padding=padding, steps=steps,
                      start_step=start_step, staging=staging, max_tokens_per_step=max_tokens_per_step,
                      seed=seed, metrics_port=metrics_port)
        self.routers: list[RouterSite] = find_sites(model, specs=specs, generic=generic)
        self._dist = resolve_distributed(distributed, self.routers)  # None on a single process
        if self._dist is not None:  # only h.step() ends steps: the flush collective never runs in a hook
            steps = "manual"
        self.flush_every = flush_every
        self._slots = {s.layer: i for i, s in enumerate(self.routers)}
        self._active = True
        self._detached = False
        self._hook_seconds = 0.0
        self._hook_calls = 0
        self._lock = threading.RLock()   # recorder buffers: router calls of several threads, step ends
        self._faults = Faults()
        self.hooks = HookRegistry()      # every hook on the model, probes' and registered actuators'
        stack_paths, stack_of = C.find_stacks(model, [s.name for s in self.routers])
        cap = max(s.n_experts for s in self.routers)
        sampler = TokenSampler(float(tokens), max_tokens_per_step, seed,
                               device=model_device(model)) if tokens else None
        self._window = Window(self.routers, Recorder(len(self.routers), cap, flush_every,
                                                     model_device(model), self._faults), sampler, self._dist)
        if not staging:
            self._window.rec.stage.disable()
        cfg = {"probes": {"tokens": float(tokens), "flush_every": flush_every, "steps": steps,
                          "padding": padding, "max_tokens_per_step": max_tokens_per_step, "seed": seed,
                          "staging": staging}}
        cfg.update(config or {})
        self.writer = open_writer(default_root() if root is None else root, run,
                                  describe(model, self.routers), cfg, self._dist)
        self.run_id = self.writer.run_id
        try:
            start = first_step(self.writer, start_step, overwrite)
        except BaseException:
            self.writer.close()
            raise
        self._sink = Sink(self.writer)
        self._stage = SnapshotStage(self.run_id, self._faults)
        self._clock = StepClock(model, steps)
        self._clock.after_update = self._window.settle
        self._steps = Steps(self._clock, self._window, self._lock, self._faults, start, flush_every,
                            weakref.WeakMethod(self._window_full))
        if self._leader is not None:
            self._steps.follow(self._leader._steps)
        self._fwd = Forwards(stack_paths, self._steps, self._faults, padding == "exclude", sampler is not None)
        self.metrics_server = None
        try:
            self._install(model, lenses or {}, stack_of)
            if metrics_port is not None:
                port = int(metrics_port) if self._dist is None else self._dist.metrics_port(metrics_port)
                self.metrics_server = self.serve_metrics(port, expert_labels=metrics_expert_labels)
        except BaseException:
            self._clock.remove()
            self.hooks.remove()
            self._sink.close()
            self.writer.close()
            raise
        _ATTACHED.setdefault(model, []).append(self)

    def _install(self, model: nn.Module, lenses: dict, stack_of: list[int]) -> None:
        unknown = set(lenses) - set(self._slots)
        if unknown:
            raise ProbeError(f"lenses given for layer(s) {sorted(unknown)} but routers are on layers "
                             f"{sorted(self._slots)}")
        self._fwd.install(model, self, self.hooks)
        for slot, site in enumerate(self.routers):
            on_output = router_hook(self, site, slot, stack_of[slot])
            module = site.module
            if site.install is not None:
                self.hooks.adopt(site.install(model, site.name, module, on_output))
            else:
                self.hooks.forward(module, on_output)
            lens = lenses.get(site.layer)
            if lens is not None:
                self.hooks.pre(module, lens_pre_hook(lens))

    # ------------------------------------------------------------------ steps
    def step(self, next_step: int | None = None) -> None:
        """End the current step; from now on only ``step()`` ends steps (the "manual" rule).

        ``next_step``: number of the step that follows (default: this one + 1); it must be
        greater than the step being ended, e.g. a trainer's global step. Raises ``ProbeError``.
        """
        cur = self._steps.current
        if next_step is not None and (isinstance(next_step, bool) or not isinstance(next_step, int)
                                      or next_step <= cur):
            raise ProbeError(f"step(next_step={next_step!r}): must be an int greater than the step "
                             f"being ended ({cur})")
        self._clock.manual()
        self._steps.advance(next_step)

    def set_mask(self, mask) -> None:
        """Padding mask for the next top-level forward, for models whose forward takes no
        ``attention_mask``: ``[B, S]`` (bool or 0/1), 0 = padding. It applies to the routers of
        the stack whose token batch is exactly ``[B, S]`` (never to positions, never to another
        stack, e.g. a decoder of other length), unless that stack gets its own ``attention_mask``;
        a mask that matches no stack is reported once. Per thread. Raises ``ProbeError``."""
        if not torch.is_tensor(mask) or mask.dim() != 2:
            raise ProbeError(f"set_mask needs a 2-D [batch, seq] tensor, got {type(mask).__name__}"
                             f"{'' if not torch.is_tensor(mask) else tuple(mask.shape)}")
        self._fwd.set_mask(mask)

    @property
    def current_step(self) -> int:
        return self._steps.current

    @property
    def detached(self) -> bool:
        """True once ``detach()`` ran (the ``with`` block ended): nothing is recorded any more."""
        return self._detached

    # ----------------------------------------------------------------- window
    def _window_full(self) -> None:
        # durability (issue #11): the write runs while the next step computes; that step's
        # end waits for it (Window.settle): a crash loses at most one flush interval
        self._close_window()

    def _close_window(self, reduce: bool = True) -> None:
        """Close the window (O(1) in its length, ``Window.close``), queue its rows for the
        background writer, then run the snapshot callbacks. ``reduce=False`` (multi-rank,
        steps no rank agreed on): this rank's routing rows only."""
        self._clock.window_closed(self._steps.current)
        job = self._window.close(self._stage, self._faults, reduce)
        if job is None:
            return
        ticket = self._sink.submit_window(job, self.routers, self._stage, self._faults)
        self._window.pending = ticket
        if job.snapshot_input is not None:   # the snapshot is built on the background thread
            self._stage.pending = ticket
        if job.snapshot is not None:
            self._stage.notify(job.snapshot, self)

    # ------------------------------------------------------------ public API
    def flush(self) -> None:
        """Close the current window now (partial) and wait until everything queued is written.

        A step with routing recorded but not yet ended by ``step()`` is ended first.
        """
        if self._detached:
            return
        with self._lock:
            self._steps.finish_open(self._dist is not None)
            self._close_window()
        self._sink.wait()

    def wait_written(self) -> None:
        """Wait until every window closed so far is in the store (closes no window)."""
        if not self._detached:
            self._sink.wait()

    def metrics(self) -> dict:
        """Live ``{layer: LayerMetrics}`` of the current window (finished steps + the running one)."""
        with self._lock:
            arrays = self._window.live()
        c, d = arrays.window_sums()
        return {s.layer: M.summarize(c[i, :n], d[i, :n])
                for i, (s, n) in enumerate(zip(self.routers, self._window.experts()))}

    def on_snapshot(self, fn):
        """Call ``fn(step, rows, handle)`` after each window's snapshot rows are built. Returns fn."""
        self._stage.callbacks.append(fn)
        return fn

    def record_decisions(self, rows: list[dict]) -> None:
        """Log controller decisions (DECISIONS rows) and keep them as ``latest_decisions()``."""
        rows = [dict(r) for r in rows]
        self._stage.latest_decisions = rows
        if rows and (self._dist is None or self._dist.is_writer_of_globals):
            self._sink.submit_decisions(rows)

    def latest_snapshot(self) -> list[dict]:
        """SNAPSHOTS rows of the latest closed window ([] before the first)."""
        self._stage.ready()
        return self._stage.latest_rows()

    def latest_expert_counts(self) -> dict:
        """``{layer: [tokens per expert]}`` of the latest closed window (``chrono.exporters.live``)."""
        self._stage.ready()
        return self._stage.latest_counts()

    def load_cursor(self, layer: int):
        """Read-only view of the router load probes counts (``chrono.router_loads.RouterLoads``):
        a cursor whose ``take()`` gives float32 ``[n_experts]`` assignments (counted + dropped,
        all modes) of ``layer``'s router since its previous take, on the device; no hook, no
        host sync. What ``chrono.govern`` hands the actuators. Raises ``ProbeError`` for a
        layer without a router."""
        if layer not in self._slots:
            raise ProbeError(f"no router on layer {layer}; routers are on layers {sorted(self._slots)}")
        with self._lock:
            if self._window.loads is None:
                self._window.loads = RecorderLoads(self._window, self._lock)
            slot = self._slots[layer]
            return self._window.loads.load_cursor(slot, self.routers[slot].n_experts)

    def latest_decisions(self) -> list[dict]:
        return list(self._stage.latest_decisions)

    def active_alerts(self) -> dict:
        self._stage.ready()
        return self._stage.tracker.active()

    def alert_transitions(self) -> dict:
        """``{(layer, alert, "raised"/"cleared"): times}`` since attach."""
        self._stage.ready()
        return dict(self._stage.transitions)

    def stats(self) -> dict:
        c, sink = self._faults.counters, self._sink.stats()
        return {
            "steps": c["steps"],
            "tokens_total": dict(self._window.tokens_total),
            "hook_seconds": self._hook_seconds + self._steps.flush_seconds,
            "hook_calls": self._hook_calls,
            "rows_written": sink["rows_written"],
            "write_errors": sink["write_errors"],
            "rows_dropped": sink["rows_dropped"],
            "nonfinite": c["nonfinite"],
            "invalid_indices": c["invalid"],
            "padding_excluded": c["padding_excluded"],
            "optimizer_steps": self._clock.optimizer_steps,
            "faults": c["faults"],
            "callback_errors": c["callback_errors"],
            "windows": self._window.closes,
            "tokens_sampled": 0 if self._window.sampler is None else self._window.sampler.sampled,
            "last_error": sink["last_error"],
            "distributed": None if self._dist is None else self._dist.stats(),
        }

    def serve_metrics(self, port: int, host: str = "127.0.0.1", expert_labels: bool = False):
        """Serve this handle's live metrics for Prometheus (``chrono.exporters.prometheus``).

        ``expert_labels``: also export per-expert token shares of the latest window (capped).
        """
        try:
            from chrono.exporters import prometheus
        except ImportError as e:
            raise ProbeError(f"the Prometheus exporter is not available ({e})") from None
        return prometheus.serve(self, port, host, expert_labels=expert_labels)

    # --------------------------------------------------------------- teardown
    def detach(self) -> None:
        """Flush, remove every hook (actuators registered with the handle too), close the
        writer. Safe to call twice."""
        if self._detached:
            return
        locked, ctrl_c = False, []
        try:
            with held_sigint() as ctrl_c:     # a Ctrl-C now: the window is queued first
                locked = self._lock.acquire()
                if self._dist is None:
                    self._steps.finish_open(multi_rank=False)
                    self._close_window()
                else:
                    self._close_window()          # steps every rank ended with h.step(): reduced
                    if self._steps.pending:
                        # routing no h.step() ended on every rank: this rank's rows, no collective
                        self._steps.advance(close=False)
                        self._close_window(reduce=False)
        except Exception as e:
            self._faults.fault("detach", e)
        finally:
            if locked:
                self._lock.release()
            self._active = False
            self._detached = self._steps.closed = True
            for handles in list(_ATTACHED.values()):
                if self in handles:
                    handles.remove(self)
            self._clock.remove()
            self.hooks.remove()
            try:
                try:
                    self._sink.close()
                except KeyboardInterrupt:   # Ctrl-C while the last windows are written:
                    self._sink.wait()       # let them finish (ms), then release the run, re-raise
                    raise
            finally:
                try:
                    self.writer.close()
                except Exception as e:
                    self._faults.fault("close", e)
                if self.metrics_server is not None:   # the port is free again once detached
                    self.metrics_server.close()
        if ctrl_c:
            raise KeyboardInterrupt

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        if self._dist is not None:
            self._dist.on_exit(self, failed=exc[0] is not None)
        self.detach()

    def __repr__(self) -> str:
        return f"<probes.Handle run={self.run_id!r} routers={len(self.routers)} step={self.current_step}>"

