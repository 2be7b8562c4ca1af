"""``probes.attach``: one call that hooks every router of a model and records routing.

What happens where:

* router forward hook (hot path): parse the router's own output, then
  ``scatter_add_`` into device buffers. No host sync, returns None.
* ``h.step()`` (or, if you never call it, the end of each top-level forward):
  moves the step's counters into a device history row.
* every ``flush_every`` steps, in the training thread: one device->host copy
  of the window, snapshot rows + alert transitions, ``on_snapshot`` callbacks;
  Arrow/Parquet work is queued to a background thread.
* leaving the ``with`` block (also by exception) or ``h.detach()``: flush,
  remove every hook, close the writer. The handle keeps only weak references
  to the model and its modules.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from collections import Counter

import numpy as np
import torch
from torch import nn

from chrono import metrics as M
from chrono.snapshots import AlertTracker, layer_rows
from chrono.store import open_run

from .discovery import RouterSite, find_sites
from .distributed import resolve as resolve_distributed
from .flusher import BackgroundWriter
from .recorder import MODES, Recorder, mode_index
from .routing import ProbeError
from .sampling import TokenSampler

log = logging.getLogger("probes")


class _NullWriter:
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


def _first_device(model: nn.Module):
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class Handle:
    """Returned by ``probes.attach``; a context manager. See the module docstring."""

    def __init__(self, model: nn.Module, run: str, root="chrono_runs", tokens: float = 0.0,
                 flush_every: int = 50, lenses=None, distributed=None, metrics_port=None,
                 generic: bool = True, specs=None, max_tokens_per_step: int = 4096, seed: int = 0,
                 start_step: int = 0, config: dict | None = None, auto_step: bool | None = None):
        if not isinstance(model, nn.Module):
            raise ProbeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ProbeError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if tokens is None:
            tokens = 0.0
        if not (0.0 <= float(tokens) <= 1.0):
            raise ProbeError(f"tokens must be 0 (aggregate only) or a fraction in (0, 1], got {tokens!r}")
        self.routers: list[RouterSite] = find_sites(model, specs=specs, generic=generic)
        self._dist = resolve_distributed(distributed, self.routers)  # None on a single process
        self.flush_every = flush_every
        self._model = weakref.ref(model)
        self._slots = {s.layer: i for i, s in enumerate(self.routers)}
        self._layer_ids = np.array([s.layer for s in self.routers], dtype=np.int32)
        cap = max(s.n_experts for s in self.routers)
        self._rec = Recorder(len(self.routers), cap, flush_every, _first_device(model))
        self._window_experts = [0] * len(self.routers)  # largest n_experts seen per router this window
        self._sampler = TokenSampler(float(tokens), max_tokens_per_step, seed) if tokens else None
        self._tracker = AlertTracker()
        self._callbacks: list = []
        self._hooks: list = []
        self._active = True
        self._detached = False
        # auto_step None: each top-level forward is a step until h.step() is first called;
        # False: only h.step() ends steps (use it with gradient accumulation)
        self._explicit_steps = auto_step is False
        self._auto_pending = False
        self._dirty = False
        self._step = int(start_step)
        self._slot = 0
        self._slot_steps: list[int] = []
        self._slot_modes: list[int] = []
        self._input_ids = None
        self._decoder_input_ids = None
        self._seq_len = None
        self._latest_snapshot: list[dict] = []
        self._latest_decisions: list[dict] = []
        self._transitions: Counter = Counter()
        self._tokens_total = {s.layer: 0 for s in self.routers}
        self._nonfinite = 0
        self._invalid = 0
        self._hook_seconds = 0.0
        self._hook_calls = 0
        self._faults = 0
        self._callback_errors = 0
        self._logged: set[str] = set()
        self._steps_done = 0
        self._windows = 0
        if self._dist is not None:  # only h.step() ends steps: the flush collective never runs in a hook
            self._explicit_steps = True

        model_desc = {
            "name": type(model).__name__,
            "layers": [s.layer for s in self.routers],
            "experts_per_layer": {str(s.layer): s.n_experts for s in self.routers},
            "top_k": max(s.top_k for s in self.routers),
            "adapter": ",".join(sorted({s.adapter for s in self.routers})),
            "sites": [s.as_dict() for s in self.routers],
        }
        cfg = {"probes": {"tokens": float(tokens), "flush_every": flush_every,
                          "max_tokens_per_step": max_tokens_per_step, "seed": seed}}
        if config:
            cfg.update(config)
        try:  # StoreError (bad run id, run already being written) is the user's to fix: it propagates
            if self._dist is not None:
                model_desc = self._dist.model_desc(model_desc)
            self.writer = open_run(root, run, model=model_desc, config=cfg, on_error="count",
                                   **(self._dist.writer_kwargs() if self._dist is not None else {}))
        except OSError as e:
            log.error("probes: cannot open run %r under %s (%s); training continues without telemetry "
                      "on disk", run, root, e)
            self.writer = _NullWriter(run, e)
        self.run_id = self.writer.run_id
        self._bg = BackgroundWriter(self.writer)
        self.metrics_server = None
        try:
            self._install(model, lenses or {})
            if metrics_port is not None:
                self.metrics_server = self.serve_metrics(self._rank_port(metrics_port))
        except BaseException:
            self._remove_hooks()
            self._bg.close()
            self.writer.close()
            raise

    # ------------------------------------------------------------- installing
    def _install(self, model: nn.Module, lenses: dict) -> None:
        unknown = set(lenses) - set(self._slots)
        if unknown:
            raise ProbeError(f"lenses given for layer(s) {sorted(unknown)} but routers are on layers "
                             f"{sorted(self._slots)}")
        for site in self.routers:
            slot = self._slots[site.layer]
            module = site.module
            on_output = self._make_hook(site, slot)
            if site.install is not None:
                self._hooks.append(site.install(model, site.name, module, on_output))
            else:
                self._hooks.append(module.register_forward_hook(on_output))
            lens = lenses.get(site.layer)
            if lens is not None:
                self._hooks.append(module.register_forward_pre_hook(_lens_pre_hook(lens)))
        self._hooks.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._root_post_hook))

    def _make_hook(self, site: RouterSite, slot: int):
        rec, sampler = self._rec, self._sampler
        handle_ref = weakref.ref(self)
        decoder_site = ".decoder." in f".{site.name}."

        def on_router_output(module, args, output):
            h = handle_ref()
            if h is None or not h._active:
                return None
            timing = not torch.compiler.is_compiling()
            t0 = time.perf_counter() if timing else 0.0
            try:
                routed = site.parse(module, args, output)
                n = site.n_experts
                if n > rec.capacity:
                    rec.grow(max(n, 2 * rec.capacity))
                if n > h._window_experts[slot]:  # a lifecycle shrink must not cut this window's counts
                    h._window_experts[slot] = n
                if routed.indices.device != rec.device:
                    rec.to(routed.indices.device)
                mode = mode_index(module)
                h._dirty = True
                rec.record(mode, slot, routed.indices, routed.weights, routed.dropped, routed.logits)
                if sampler is not None:
                    ids = h._decoder_input_ids if decoder_site else h._input_ids
                    sampler.sample(site.layer, mode, routed.indices, routed.weights, routed.dropped,
                                   ids, h._seq_len)
            except Exception as e:  # telemetry must never break the forward
                h._fault(f"router {site.name}", e)
            if timing:
                h._hook_seconds += time.perf_counter() - t0
                h._hook_calls += 1
            return None

        return on_router_output

    def _root_pre_hook(self, module, args, kwargs):
        if not self._active:
            return None
        if self._auto_pending and not self._explicit_steps:
            self._advance()  # the previous top-level forward was a step of its own
        ids = kwargs.get("input_ids")
        if ids is None and args and torch.is_tensor(args[0]) and not torch.is_floating_point(args[0]):
            ids = args[0]
        emb = kwargs.get("inputs_embeds")
        self._input_ids = ids
        self._decoder_input_ids = kwargs.get("decoder_input_ids")
        if ids is not None and ids.dim() >= 2:
            self._seq_len = int(ids.shape[-1])
        elif emb is not None and emb.dim() >= 3:
            self._seq_len = int(emb.shape[-2])
        elif args and torch.is_tensor(args[0]) and args[0].dim() >= 2:
            self._seq_len = int(args[0].shape[1])
        else:
            self._seq_len = None
        return None

    def _root_post_hook(self, module, args, output):
        if self._active and not self._explicit_steps:
            self._auto_pending = True
        return None

    # ------------------------------------------------------------------ steps
    def step(self) -> None:
        """End the current step. Once called, top-level forwards no longer advance the step."""
        self._explicit_steps = True
        self._advance()

    def _finish_open_step(self) -> None:
        if self._dirty or self._auto_pending:
            if self._dist is not None:  # rank-local condition: ending a step here would desync ranks
                self._warn_once("dist-open-step", "probes: routing recorded after the last h.step() "
                                "is not reduced in multi-rank mode (end steps with h.step() on every rank)")
                return
            self._advance()

    @torch._dynamo.disable
    def _advance(self) -> None:
        if self._detached:
            return
        self._auto_pending = False
        self._dirty = False
        try:
            self._rec.end_step(self._slot)
            if self._sampler is not None:
                self._sampler.end_step(self._step)
            self._slot_steps.append(self._step)
            self._slot += 1
            self._step += 1
            self._steps_done += 1
            self._input_ids = self._decoder_input_ids = None
            if self._slot >= self.flush_every:
                self._close_window()
                # durability over latency (issue #11): the window is on disk before training goes
                # on, so a crash loses at most one flush interval. Costs one Parquet write of the
                # window's aggregate rows (milliseconds) per flush_every steps.
                self._bg.wait()
        except Exception as e:
            self._fault("step", e)

    # ----------------------------------------------------------------- window
    def _experts(self) -> list[int]:
        """Expert count per router for the window being closed: the largest seen in it.

        An expert removed mid-window (pruning) still received tokens in the
        window's earlier steps; cutting to the new, smaller count would lose them.
        """
        return [max(s.n_experts, w) for s, w in zip(self.routers, self._window_experts)]

    def _close_window(self) -> None:
        n = self._slot
        steps = np.array(self._slot_steps, dtype=np.int64)
        self._slot, self._slot_steps = 0, []
        data = self._rec.take(n) if n else None
        tok = self._sampler.take() if self._sampler is not None else None
        if self._dist is not None:
            tok = self._dist.globalize_tokens(tok)
        if data is None and tok is None:
            self._window_experts = [0] * len(self.routers)
            return
        self._windows += 1
        signals, rows, transitions, routing_jobs = [], [], [], []
        if data is not None:
            routing_jobs, rows, transitions, signals = self._window_rows(steps, data)
        # routers that grew or shrank (lifecycle) are declared before their rows (chrono.validate);
        # expert-parallel ranks keep the global counts declared at attach
        sizes = {} if self._dist is not None and self._dist.expert_parallel else \
            dict(zip(self._layer_ids.tolist(), self._experts()))
        self._window_experts = [0] * len(self.routers)
        run_id = self.run_id
        write_globals = self._dist is None or self._dist.is_writer_of_globals

        def write(w):
            for layer, n in sizes.items():
                w.declare_experts(layer, n)
            for kw in routing_jobs:
                w.log_routing(**kw)
            if tok is not None:
                _log_token_rows(w, *tok)
            if write_globals:
                w.log_rows("snapshots", rows)
                w.log_rows("alerts", transitions)
            for step, name, value, layer in signals:
                w.log_signal(step, name, value, layer=layer)

        n_rows = sum(int(np.prod(np.shape(kw["counts"]))) for kw in routing_jobs)
        self._bg.submit(write, rows=n_rows + (0 if tok is None else len(tok[1])))
        if rows:
            for fn in list(self._callbacks):
                try:
                    fn(int(rows[0]["step"]), rows, self)
                except Exception:
                    self._callback_errors += 1
                    key = f"callback:{getattr(fn, '__qualname__', fn)}"
                    if key not in self._logged:
                        self._logged.add(key)
                        log.exception("probes: on_snapshot callback %r raised (run %s); training "
                                      "continues, later errors of it are only counted", fn, run_id)

    def _window_rows(self, steps, data):
        counts, weight, dropped = data["counts"], data["weight"], data["dropped"]
        experts = self._experts()
        # experts at or beyond a layer's current n_experts are invalid indices too
        invalid = data["invalid"].sum(axis=(0, 1)) + np.array(
            [counts[:, :, i, n:].sum() + dropped[:, :, i, n:].sum() for i, n in enumerate(experts)])
        # one routing call per (mode, expert count): rows for steps with traffic in that mode
        jobs = []
        traffic = counts.sum(axis=(2, 3)) + dropped.sum(axis=(2, 3))  # [n, mode]
        for m, mode in enumerate(MODES):
            active = np.flatnonzero(traffic[:, m] > 0)
            if not len(active):
                continue
            for e in sorted(set(experts)):
                grp = [i for i, x in enumerate(experts) if x == e]
                sel = np.ix_(active, [m], grp)
                jobs.append(dict(step=steps[active][:, None], layer=self._layer_ids[grp][None, :],
                                 counts=counts[sel][:, 0, :, :e], mode=mode,
                                 weight_sum=weight[sel][:, 0, :, :e], dropped=dropped[sel][:, 0, :, :e]))
                if self._dist is not None and self._dist.expert_parallel:
                    jobs[-1]["expert_offset"] = self._dist.expert_offsets(grp)[None, :]
        win_counts = counts.sum(axis=(0, 1))   # [slot, cap+1]
        win_drop = dropped.sum(axis=(0, 1))
        cap = self._rec.capacity
        snap_counts, snap_drop, snap_experts = win_counts[:, :cap], win_drop[:, :cap], experts
        if self._dist is not None:  # the flush's one collective: identical rows on every rank
            snap_counts, snap_drop, snap_experts = self._dist.reduce_window(
                win_counts, win_drop, experts, len(steps), int(steps[-1]))
        rows, transitions, signals = [], [], []
        if any(snap_counts[i, :n].sum() + snap_drop[i, :n].sum() > 0 for i, n in enumerate(snap_experts)):
            lc = {s.layer: snap_counts[i, :snap_experts[i]] for i, s in enumerate(self.routers)}
            ld = {s.layer: snap_drop[i, :snap_experts[i]] for i, s in enumerate(self.routers)}
            rows = layer_rows(self.run_id, int(steps[0]), int(steps[-1]), lc, ld)
            transitions = self._tracker.update(rows)
            for t in transitions:
                self._transitions[(t["layer"], t["alert"], t["transition"])] += 1
            self._latest_snapshot = rows
        for i, s in enumerate(self.routers):
            self._tokens_total[s.layer] += int(win_counts[i, :experts[i]].sum())
        nf = data["nonfinite"].sum(axis=(0, 1))
        end = int(steps[-1])
        for i, s in enumerate(self.routers):
            if nf[i]:
                self._nonfinite += int(nf[i])
                signals.append((end, "probes.nonfinite", float(nf[i]), s.layer))
                self._warn_once(f"nonfinite{s.layer}", "probes: non-finite router outputs on layer %d "
                                "(%d step/expert cells) in steps %d-%d (signal probes.nonfinite)",
                                s.layer, int(nf[i]),
                                int(steps[0]), end)
            if invalid[i]:
                self._invalid += int(invalid[i])
                signals.append((end, "probes.invalid_expert_index", float(invalid[i]), s.layer))
                self._warn_once(f"invalid{s.layer}", "probes: router %s returned %d expert indices "
                                "outside [0, %d)", s.name, int(invalid[i]), experts[i])
        return jobs, rows, transitions, signals

    # ------------------------------------------------------------ public API
    def flush(self) -> None:
        """Close the current window now (partial) and wait until everything queued is written.

        A step with routing recorded but not yet ended by ``step()`` is ended first.
        """
        if self._detached:
            return
        self._finish_open_step()
        self._close_window()
        self._bg.wait()

    def metrics(self) -> dict:
        """Live ``{layer: LayerMetrics}`` of the current window (finished steps + the running one)."""
        data = self._rec.take(self._slot, include_current=True)
        c, d = data["counts"].sum(axis=(0, 1)), data["dropped"].sum(axis=(0, 1))
        return {s.layer: M.summarize(c[i, :n], d[i, :n])
                for i, (s, n) in enumerate(zip(self.routers, self._experts()))}

    def on_snapshot(self, fn):
        """Call ``fn(step, rows, handle)`` after each window's snapshot rows are built. Returns fn."""
        self._callbacks.append(fn)
        return fn

    def record_decisions(self, rows: list[dict]) -> None:
        """Log controller decisions (DECISIONS rows) and keep them as ``latest_decisions()``."""
        rows = [dict(r) for r in rows]
        self._latest_decisions = rows
        if rows and (self._dist is None or self._dist.is_writer_of_globals):
            self._bg.submit(lambda w: w.log_rows("decisions", rows), rows=len(rows))

    def latest_snapshot(self) -> list[dict]:
        return list(self._latest_snapshot)

    def latest_decisions(self) -> list[dict]:
        return list(self._latest_decisions)

    def active_alerts(self) -> dict:
        return self._tracker.active()

    def alert_transitions(self) -> dict:
        return dict(self._transitions)

    @property
    def current_step(self) -> int:
        return self._step

    def stats(self) -> dict:
        ws = self.writer.stats
        return {
            "steps": self._steps_done,
            "tokens_total": dict(self._tokens_total),
            "hook_seconds": self._hook_seconds,
            "hook_calls": self._hook_calls,
            "rows_written": dict(ws.rows_written),
            "write_errors": ws.write_errors + self._bg.errors,
            "rows_dropped": ws.rows_dropped + self._bg.rows_dropped,
            "nonfinite": self._nonfinite,
            "invalid_indices": self._invalid,
            "faults": self._faults,
            "callback_errors": self._callback_errors,
            "windows": self._windows,
            "tokens_sampled": 0 if self._sampler is None else self._sampler.sampled,
            "last_error": ws.last_error or self._bg.last_error,
            "distributed": None if self._dist is None else self._dist.stats(),
        }

    def _rank_port(self, port: int) -> int:
        """``metrics_port`` for this process: several ranks on one node must not share a port.

        Multi-rank: ``port + LOCAL_RANK`` (torchrun sets it; without it, ``port +
        rank``), so a node with 8 ranks serves ``port .. port+7``. ``0`` (any free
        port) stays 0.
        """
        if self._dist is None or int(port) == 0:
            return int(port)
        local = os.environ.get("LOCAL_RANK")
        offset = int(local) if local is not None and local.isdigit() else self._dist.global_rank
        return int(port) + offset

    def serve_metrics(self, port: int, host: str = "127.0.0.1"):
        """Serve this handle's live metrics for Prometheus (``chrono.exporters.prometheus``)."""
        try:
            from chrono.exporters import prometheus
        except ImportError as e:
            raise ProbeError(f"the Prometheus exporter is not available ({e})") from None
        return prometheus.serve(self, port, host)

    # --------------------------------------------------------------- teardown
    def detach(self) -> None:
        """Flush, remove every hook, close the writer. Safe to call twice."""
        if self._detached:
            return
        try:
            self._finish_open_step()
            self._close_window()
        except Exception as e:
            self._fault("detach", e)
        finally:
            self._active = False
            self._detached = True
            self._remove_hooks()
            self._bg.close()
            try:
                self.writer.close()
            except Exception as e:
                self._fault("close", e)
            if self.metrics_server is not None:   # the port is free again once detached
                self.metrics_server.close()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            try:
                h.remove()
            except Exception:
                pass
        self._hooks = []

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        if self._dist is not None:
            self._dist.on_exit(self, failed=exc[0] is not None)
        self.detach()

    def __repr__(self) -> str:
        return f"<probes.Handle run={self.run_id!r} routers={len(self.routers)} step={self._step}>"

    # ---------------------------------------------------------------- faults
    def _fault(self, where: str, e: BaseException) -> None:
        self._faults += 1
        key = f"{where}:{type(e).__name__}"
        if key not in self._logged:
            self._logged.add(key)
            log.error("probes: telemetry fault in %s (%s: %s); training continues", where,
                      type(e).__name__, e)

    def _warn_once(self, key, msg, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)


def _guard_hooks_under_compile() -> None:
    """Make torch.compile guard on module hooks (DESIGN §5).

    With the default ``skip_nnmodule_hook_guards = True`` a model compiled
    before ``attach`` keeps running code without our hooks (0 tokens counted),
    and a second instance of a class can reuse code compiled for the first.
    Guarding costs a recompile when hooks change, which is what we want. Done
    at ``import probes`` so that code compiled before ``attach`` is guarded too.
    """
    try:
        import torch._dynamo.config as dynamo_config
    except Exception:  # pragma: no cover - torch without dynamo
        return
    if getattr(dynamo_config, "skip_nnmodule_hook_guards", False):
        dynamo_config.skip_nnmodule_hook_guards = False
        log.info("probes: set torch._dynamo.config.skip_nnmodule_hook_guards = False so compiled "
                 "code sees probes' hooks")


def _lens_pre_hook(lens: nn.Module):
    def apply_lens(module, args):
        if not args:
            return None
        return (lens(args[0]),) + tuple(args[1:])
    return apply_lens


def _log_token_rows(w, ints: np.ndarray, weights: np.ndarray) -> None:
    keep = ints[:, 8] == 0  # dropped assignments are not routing facts of an expert
    ints, weights = ints[keep], weights[keep]
    for m, mode in enumerate(MODES):
        sel = ints[:, 2] == m
        if not sel.any():
            continue
        x, wt = ints[sel], weights[sel]
        tid = x[:, 7]
        w.log_tokens(step=x[:, 0], layer=x[:, 1], expert=x[:, 6],
                     weight=None if np.isnan(wt).all() else wt,
                     batch_idx=x[:, 3], position=x[:, 4], k=x[:, 5],
                     token_id=None if (tid < 0).all() else tid, mode=mode)


def attach(model: nn.Module, run: str, root="chrono_runs", tokens: float = 0.0, flush_every: int = 50,
           lenses=None, distributed=None, metrics_port=None, generic: bool = True, specs=None,
           **options) -> Handle:
    """Hook every MoE router of ``model`` and record routing into run ``run`` under ``root``.

    ``tokens``: 0 = aggregate counts only; a fraction in (0, 1] samples that
    share of tokens into the ``tokens`` table (``max_tokens_per_step`` bounds
    it per layer). ``flush_every``: steps per window (snapshot + write).
    ``lenses``: ``{layer: nn.Module}`` applied to that router's input.
    ``generic``: allow guessing routers when no adapter matches. ``specs``:
    ``[probes.RouterSpec(...)]`` for routers no adapter knows. Other options:
    ``max_tokens_per_step`` (4096), ``seed`` (0), ``start_step`` (0), ``config`` (dict for the
    manifest), ``auto_step`` (None: every top-level forward ends a step until ``h.step()`` is first
    called; False: only ``h.step()`` does, e.g. with several forwards per step from the start).
    """
    return Handle(model, run, root=root, tokens=tokens, flush_every=flush_every, lenses=lenses,
                  distributed=distributed, metrics_port=metrics_port, generic=generic, specs=specs,
                  **options)


_guard_hooks_under_compile()
