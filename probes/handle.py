"""``probes.attach``: one call that hooks every router of a model and records routing.

(Over 400 lines: the Handle still holds install, hooks, step handling and the window sink;
splitting it by concept with typed records is issue 17, item 3.)

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

import contextlib
import logging
import os
import threading
import time
import weakref
from collections import Counter

import numpy as np
import torch
from torch import nn

from chrono import metrics as M
from chrono.snapshots import AlertTracker, layer_rows
from chrono.store import StoreError, default_root, open_run

from . import context as C
from .clock import StepClock
from .discovery import RouterSite, find_sites
from .distributed import resolve as resolve_distributed
from .flusher import BackgroundWriter
from .recorder import Recorder, mode_index
from .routing import ProbeError
from .sampling import TokenSampler
from .window import log_token_rows, padding_signals, routing_jobs

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


class _ForwardState(threading.local):
    """Per-thread state of the running forward: stack contexts, root mode, the user's mask."""

    def __init__(self, n_stacks: int):
        self.ctx: list = [None] * n_stacks   # ForwardContext of each stack's running call
        self.root_mode = None                 # mode of the running top-level forward
        self.pseudo_root = None               # stack acting as the top level (model hooks bypassed)
        self.user_mask = None                 # h.set_mask(): for the next top-level forward
        self.mask_used = False


class Handle:
    """Returned by ``probes.attach``; a context manager. See the module docstring."""

    def __init__(self, model: nn.Module, run: str, root=None, tokens: float = 0.0,
                 flush_every: int = 50, lenses=None, distributed=None, metrics_port=None,
                 generic: bool = True, specs=None, max_tokens_per_step: int = 4096, seed: int = 0,
                 start_step: int | None = None, overwrite: bool = False, steps: str = "auto",
                 padding: str = "exclude", config: dict | None = None, auto_step: bool | None = None,
                 metrics_expert_labels: bool = False):
        if not isinstance(model, nn.Module):
            raise ProbeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ProbeError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if tokens is None:
            tokens = 0.0
        if not (0.0 <= float(tokens) <= 1.0):
            raise ProbeError(f"tokens must be 0 (aggregate only) or a fraction in (0, 1], got {tokens!r}")
        if padding not in ("exclude", "count"):
            raise ProbeError(f"padding must be 'exclude' (default) or 'count', got {padding!r}")
        if auto_step is False:       # the pre-0.2 spelling of steps="manual"
            steps = "manual"
        self._leader = None
        self._followers: list = []
        if isinstance(steps, Handle):   # follow another handle's steps (a frozen reference model)
            if steps._detached:
                raise ProbeError("steps=<handle>: that handle is already detached")
            self._leader, steps = steps, "manual"
            if start_step is None:
                start_step = self._leader.current_step
        if steps not in ("auto", "optimizer", "forward", "manual"):
            raise ProbeError(f"steps must be 'auto', 'optimizer', 'forward', 'manual' or a probes "
                             f"Handle to follow, got {steps!r}")
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)
                                       or start_step < 0):
            raise ProbeError(f"start_step must be None or an int >= 0, got {start_step!r}")
        self.routers: list[RouterSite] = find_sites(model, specs=specs, generic=generic)
        self._dist = resolve_distributed(distributed, self.routers)  # None on a single process
        if self._dist is not None:  # only h.step() ends steps: the flush collective never runs in a hook
            steps = "manual"
        self.flush_every = flush_every
        self._model = weakref.ref(model)
        self._slots = {s.layer: i for i, s in enumerate(self.routers)}
        self._layer_ids = np.array([s.layer for s in self.routers], dtype=np.int32)
        cap = max(s.n_experts for s in self.routers)
        self._rec = Recorder(len(self.routers), cap, flush_every, _first_device(model))
        self._window_experts = [0] * len(self.routers)  # largest n_experts seen per router this window
        self._sampler = TokenSampler(float(tokens), max_tokens_per_step, seed,
                                     device=_first_device(model)) if tokens else None
        self._exclude_padding = padding == "exclude"
        stack_paths, self._stack_of = C.find_stacks(model, [s.name for s in self.routers])
        self._stack_paths = stack_paths
        # per-thread forward state (threaded serving: one request's mask never applies to another's)
        self._tls = _ForwardState(len(stack_paths))
        self._lock = threading.RLock()   # recorder buffers: router calls of several threads, step ends
        self._tracker = AlertTracker()
        self._callbacks: list = []
        self._hooks: list = []
        self._active = True
        self._detached = False
        self._dirty = False
        self._slot_steps: list[int] = []
        self._latest_snapshot: list[dict] = []
        self._latest_decisions: list[dict] = []
        self._latest_counts: dict = {}
        self._transitions: Counter = Counter()
        self._tokens_total = {s.layer: 0 for s in self.routers}
        self._counters = Counter()   # nonfinite, invalid, padding_excluded, faults, callback_errors
        self._hook_seconds = 0.0
        self._hook_calls = 0
        self._logged: set[str] = set()
        self._windows = 0

        model_desc = {
            "name": type(model).__name__,
            "layers": [s.layer for s in self.routers],
            "experts_per_layer": {str(s.layer): s.n_experts for s in self.routers},
            "top_k": max(s.top_k for s in self.routers),
            "adapter": ",".join(sorted({s.adapter for s in self.routers})),
            "sites": [s.as_dict() for s in self.routers],
        }
        cfg = {"probes": {"tokens": float(tokens), "flush_every": flush_every, "steps": steps,
                          "padding": padding, "max_tokens_per_step": max_tokens_per_step, "seed": seed}}
        if config:
            cfg.update(config)
        root = default_root() if root is None else root
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
        try:
            self._step = self._first_step(start_step, overwrite)
        except BaseException:
            self.writer.close()
            raise
        self._bg = BackgroundWriter(self.writer)
        self._clock = StepClock(model, steps, on_first_update=self._merge_provisional)
        if self._leader is not None:
            self._leader._followers.append(weakref.ref(self))
        self.metrics_server = None
        try:
            self._install(model, lenses or {})
            if metrics_port is not None:
                self.metrics_server = self.serve_metrics(self._rank_port(metrics_port),
                                                         expert_labels=metrics_expert_labels)
        except BaseException:
            self._clock.remove()
            self._remove_hooks()
            self._bg.close()
            self.writer.close()
            raise

    def _first_step(self, start_step, overwrite: bool) -> int:
        """Where this session's steps start: after the run's stored steps, or ``start_step``."""
        stored = getattr(self.writer, "next_step", 0)   # 0 for a run that could not be opened
        if start_step is None:
            if overwrite and stored:
                log.warning("probes: run %r: overwrite=True without start_step replaces nothing; steps "
                            "continue at %d (pass start_step=0 to replace the whole run)",
                            self.run_id, stored)
            return stored
        if start_step < stored:
            if not overwrite:
                raise StoreError(
                    f"run {self.run_id!r} already has steps up to {stored - 1} for this rank; "
                    f"start_step={start_step} would write them twice. Leave start_step=None to "
                    f"continue at {stored}, or pass overwrite=True to replace steps >= {start_step}")
            removed = self.writer.truncate(start_step)
            log.warning("probes: run %r: removed stored rows of steps >= %d before resuming (%s)",
                        self.run_id, start_step, ", ".join(f"{t}: {n}" for t, n in removed.items()) or "none")
        return int(start_step)

    # ------------------------------------------------------------- installing
    def _install(self, model: nn.Module, lenses: dict) -> None:
        unknown = set(lenses) - set(self._slots)
        if unknown:
            raise ProbeError(f"lenses given for layer(s) {sorted(unknown)} but routers are on layers "
                             f"{sorted(self._slots)}")
        # the model's own hooks first: they see the top-level forward before any stack or router
        root_pre, root_post = self._make_root_hooks(model)
        self._hooks.append(model.register_forward_pre_hook(root_pre, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(root_post, always_call=True))
        for i, path in enumerate(self._stack_paths):
            stack = model.get_submodule(path) if path else model
            pre, post = self._make_stack_hooks(i, stack)
            self._hooks.append(stack.register_forward_pre_hook(pre, with_kwargs=True))
            self._hooks.append(stack.register_forward_hook(post, always_call=True))
        for site in self.routers:
            slot = self._slots[site.layer]
            module = site.module
            on_output = self._make_hook(site, slot, self._stack_of[slot])
            if site.install is not None:
                self._hooks.append(site.install(model, site.name, module, on_output))
            else:
                self._hooks.append(module.register_forward_hook(on_output))
            lens = lenses.get(site.layer)
            if lens is not None:
                self._hooks.append(module.register_forward_pre_hook(_lens_pre_hook(lens)))

    def _make_stack_hooks(self, i: int, stack: nn.Module):
        handle_ref, stack_ref = weakref.ref(self), weakref.ref(stack)
        ids_index = C._ids_param_index(stack)

        @torch._dynamo.disable
        def stack_pre(module, args, kwargs):
            h = handle_ref()
            if h is None or not h._active or module is not stack_ref() or C.in_backward():
                return None   # (a deep copy of the model carries this hook: it records nothing)
            st = h._tls
            try:
                if st.root_mode is None and st.pseudo_root is None:
                    # the model's own forward hooks were bypassed (a wrapper called model.forward,
                    # e.g. PEFT): this stack's call is the top-level forward
                    st.pseudo_root = i
                    h._forward_starts(C.forward_mode(module))
                mode = st.root_mode if st.root_mode is not None else C.forward_mode(module)
                st.ctx[i] = ctx = C.capture(module, args, kwargs, mode, ids_index, h._exclude_padding,
                                            user_mask=st.user_mask)
                st.mask_used = st.mask_used or ctx.used_user_mask
            except Exception as e:
                st.ctx[i] = None
                h._fault("forward context", e)
            return None

        @torch._dynamo.disable
        def stack_post(module, args, output):
            h = handle_ref()
            if h is None or module is not stack_ref() or C.in_backward():
                return None
            st = h._tls
            st.ctx[i] = None
            if st.pseudo_root == i:
                st.pseudo_root = None
                h._forward_ends()
            return None

        return stack_pre, stack_post

    def _make_hook(self, site: RouterSite, slot: int, stack: int):
        rec, sampler = self._rec, self._sampler
        handle_ref, router_ref = weakref.ref(self), site._module

        def on_router_output(module, args, output):
            h = handle_ref()
            if h is None or not h._active or module is not router_ref():
                return None   # detached, or a deep copy of the model that carries this hook
            compiling = torch.compiler.is_compiling()
            if not compiling and C.in_backward():
                return None   # activation recompute: these tokens were counted in the forward
            t0 = 0.0 if compiling else time.perf_counter()
            try:
                routed = site.parse(module, args, output)
                n = site.n_experts
                if n > rec.capacity:
                    rec.grow(max(n, 2 * rec.capacity))
                if n > h._window_experts[slot]:  # a lifecycle shrink must not cut this window's counts
                    h._window_experts[slot] = n
                if routed.indices.device != rec.device:
                    rec.to(routed.indices.device)
                st = h._tls
                ctx = st.ctx[stack]
                if ctx is not None and ctx.n_tokens != routed.indices.shape[0]:
                    if ctx.keep is not None or sampler is not None:   # only then is something lost
                        h._warn_once(f"ctx{slot}", "probes: router %s saw %d tokens, not batch x sequence "
                                     "= %s of its forward: no padding mask, token ids or positions "
                                     "for it", site.name, routed.indices.shape[0], ctx.n_tokens)
                    mode, ctx = ctx.mode, None
                else:
                    mode = ctx.mode if ctx is not None else (
                        st.root_mode if st.root_mode is not None else mode_index(module))
                h._dirty = True
                mask, pad = (ctx.keep, ctx.pad) if ctx is not None and ctx.keep is not None else (None, None)
                # in-place adds from two threads would race: serialise them (~0.1 us); a lock cannot
                # be traced, so compiled code runs unguarded (compiled serving from threads: unsupported)
                with contextlib.nullcontext() if compiling else h._lock:
                    rec.record(mode, slot, routed.indices, routed.weights, routed.dropped, routed.logits,
                               mask, pad)
                    if sampler is not None:
                        sampler.sample(site.layer, mode, routed.indices, routed.weights, routed.dropped, ctx)
            except Exception as e:  # telemetry must never break the forward
                h._fault(f"router {site.name}", e)
            if not compiling:
                h._hook_seconds += time.perf_counter() - t0
                h._hook_calls += 1
            return None

        return on_router_output

    def _make_root_hooks(self, model: nn.Module):
        """Hooks on the attached model: the step clock's view of top-level forwards. Closures over
        weak references (not bound methods), so ``copy.deepcopy(model)`` never copies the handle,
        and a copy's forwards are not recorded."""
        handle_ref, model_ref = weakref.ref(self), weakref.ref(model)

        @torch._dynamo.disable
        def root_pre(module, args, kwargs):
            h = handle_ref()
            if h is None or not h._active or module is not model_ref() or C.in_backward():
                return None
            h._forward_starts(C.forward_mode(module))
            return None

        @torch._dynamo.disable
        def root_post(module, args, output):
            h = handle_ref()
            if h is not None and h._active and module is model_ref() and not C.in_backward():
                h._forward_ends()
            return None

        return root_pre, root_post

    def _forward_starts(self, mode: int) -> None:
        if self._clock.forward_starts(mode, self._step):
            self._advance()
        self._tls.root_mode = mode

    def _forward_ends(self) -> None:
        st = self._tls
        st.root_mode = None
        if st.user_mask is not None and not st.mask_used:
            self._warn_once("mask-unused", "probes: h.set_mask(mask) of shape %s matched no "
                            "[batch, seq] of the forward; nothing was excluded", tuple(st.user_mask.shape))
        st.user_mask, st.mask_used = None, False
        self._clock.forward_pending = True

    # ------------------------------------------------------------------ steps
    def step(self, next_step: int | None = None) -> None:
        """End the current step; from now on only ``step()`` ends steps (the "manual" rule).

        ``next_step``: number of the step that follows (default: this one + 1); it must be
        greater than the step being ended, e.g. a trainer's global step. Raises ``ProbeError``.
        """
        if next_step is not None and (isinstance(next_step, bool) or not isinstance(next_step, int)
                                      or next_step <= self._step):
            raise ProbeError(f"step(next_step={next_step!r}): must be an int greater than the step "
                             f"being ended ({self._step})")
        self._clock.manual()
        self._advance(next_step)

    def set_mask(self, mask) -> None:
        """Padding mask for the next top-level forward, for models whose forward takes no
        ``attention_mask``: ``[B, S]`` (bool or 0/1), 0 = padding. It applies to the routers of
        the stack whose token batch is exactly ``[B, S]`` (never to positions, never to another
        stack, e.g. a decoder of other length), unless that stack gets its own ``attention_mask``;
        a mask that matches no stack is reported once. Per thread."""
        if not torch.is_tensor(mask) or mask.dim() != 2:
            raise ProbeError(f"set_mask needs a 2-D [batch, seq] tensor, got {type(mask).__name__}"
                             f"{'' if not torch.is_tensor(mask) else tuple(mask.shape)}")
        self._tls.user_mask, self._tls.mask_used = mask, False

    def _merge_provisional(self, first_step, split: bool = False) -> None:
        """The first optimizer step arrived ("auto" rule): the forwards since ``first_step`` were
        one training step, not one step each. Fold them into the open step."""
        with self._lock:
            try:
                if split:
                    self._warn_once("split", "probes: forwards before the first optimizer step did not fit "
                                    "in one window (flush_every=%d): those already written stay one step "
                                    "each; use steps='optimizer' for exact steps from the start",
                                    self.flush_every)
                if first_step is not None:
                    self._fold_from(first_step)
                    for ref in list(self._followers):
                        f = ref()
                        if f is not None and not f._detached:
                            f._fold_from(first_step)
            except Exception as e:
                self._fault("step merge", e)

    def _fold_from(self, first_step: int) -> None:
        """Fold the window's steps ``>= first_step`` and the open step into one open step."""
        if first_step == self._step or first_step not in self._slot_steps:
            return
        j = self._slot_steps.index(first_step)
        self._rec.merge(j, len(self._slot_steps))
        if self._sampler is not None:
            self._sampler.restep(first_step)
        self._counters["steps"] -= len(self._slot_steps) - j
        self._slot_steps = self._slot_steps[:j]
        self._step = first_step
        self._dirty = True

    def _finish_open_step(self) -> None:
        if self._dirty or self._clock.forward_pending:
            if self._dist is not None:  # rank-local condition: ending a step here would desync ranks
                self._warn_once("dist-open-step", "probes: routing recorded after the last h.step() "
                                "is not reduced in multi-rank mode; it is written as this rank's rows "
                                "at detach (end steps with h.step() on every rank)")
                return
            self._advance()

    @torch._dynamo.disable
    def _advance(self, next_step: int | None = None, close: bool = True) -> None:
        with self._lock:
            if self._detached:
                return
            self._dirty = False
            self._clock.step_ended()
            try:
                slot = len(self._slot_steps)
                self._rec.end_step(slot)
                if self._sampler is not None:
                    self._sampler.end_step(self._step)
                self._slot_steps.append(self._step)
                self._counters["steps"] += 1
                self._step = self._step + 1 if next_step is None else int(next_step)
                for ref in list(self._followers):    # handles following this one end their step too
                    f = ref()
                    if f is None or f._detached:
                        self._followers.remove(ref)
                    elif f._step < self._step:
                        f._advance(self._step)
                if close and len(self._slot_steps) >= self.flush_every:
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

    def _close_window(self, reduce: bool = True) -> None:
        """Write the window's finished steps. ``reduce=False`` (multi-rank, steps no rank agreed
        on): this rank's routing rows only, no collective and no global snapshot rows."""
        n = len(self._slot_steps)
        steps = np.array(self._slot_steps, dtype=np.int64)
        self._slot_steps = []
        self._clock.window_closed(self._step)
        data = self._rec.take(n) if n else None
        tok = self._sampler.take() if self._sampler is not None else None
        if self._dist is not None:
            tok = self._dist.globalize_tokens(tok)
        if data is None and tok is None:
            self._window_experts = [0] * len(self.routers)
            return
        self._windows += 1
        signals, rows, transitions, jobs = [], [], [], []
        if data is not None:
            jobs, rows, transitions, signals = self._window_rows(steps, data, reduce)
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
            for kw in jobs:
                w.log_routing(**kw)
            if tok is not None:
                log_token_rows(w, *tok)
            if write_globals:
                w.log_rows("snapshots", rows)
                w.log_rows("alerts", transitions)
            for step, name, value, layer in signals:
                w.log_signal(step, name, value, layer=layer)

        n_rows = sum(int(np.prod(np.shape(kw["counts"]))) for kw in jobs)
        self._bg.submit(write, rows=n_rows + (0 if tok is None else len(tok[1])))
        if rows:
            for fn in list(self._callbacks):
                try:
                    fn(int(rows[0]["step"]), rows, self)
                except Exception:
                    self._counters["callback_errors"] += 1
                    key = f"callback:{getattr(fn, '__qualname__', fn)}"
                    if key not in self._logged:
                        self._logged.add(key)
                        log.exception("probes: on_snapshot callback %r raised (run %s); training "
                                      "continues, later errors of it are only counted", fn, run_id)

    def _window_rows(self, steps, data, reduce: bool = True):
        counts, weight, dropped = data["counts"], data["weight"], data["dropped"]
        experts = self._experts()
        # experts at or beyond a layer's current n_experts are invalid indices too
        invalid = data["invalid"].sum(axis=(0, 1)) + np.array(
            [counts[:, :, i, n:].sum() + dropped[:, :, i, n:].sum() for i, n in enumerate(experts)])
        offsets = (self._dist.expert_offsets if self._dist is not None and self._dist.expert_parallel
                   else None)
        jobs = routing_jobs(steps, self._layer_ids, experts, counts, weight, dropped, offsets)
        win_counts = counts.sum(axis=(0, 1))   # [slot, cap+1]
        win_drop = dropped.sum(axis=(0, 1))
        cap = self._rec.capacity
        snap_counts, snap_drop, snap_experts = win_counts[:, :cap], win_drop[:, :cap], experts
        rows, transitions = [], []
        signals = padding_signals(steps, self._layer_ids, data["padding"])
        self._counters["padding_excluded"] += int(data["padding"].sum())
        if self._dist is not None and reduce:  # the flush's one collective: identical rows on every rank
            snap_counts, snap_drop, snap_experts = self._dist.reduce_window(
                win_counts, win_drop, experts, len(steps), int(steps[-1]))
        if (self._dist is None or reduce) and any(
                snap_counts[i, :n].sum() + snap_drop[i, :n].sum() > 0 for i, n in enumerate(snap_experts)):
            lc = {s.layer: snap_counts[i, :snap_experts[i]] for i, s in enumerate(self.routers)}
            ld = {s.layer: snap_drop[i, :snap_experts[i]] for i, s in enumerate(self.routers)}
            rows = layer_rows(self.run_id, int(steps[0]), int(steps[-1]), lc, ld)
            transitions = self._tracker.update(rows)
            for t in transitions:
                self._transitions[(t["layer"], t["alert"], t["transition"])] += 1
            self._latest_snapshot = rows
            self._latest_counts = {layer: [int(x) for x in c] for layer, c in lc.items()}
        for i, s in enumerate(self.routers):
            self._tokens_total[s.layer] += int(win_counts[i, :experts[i]].sum())
        nf = data["nonfinite"].sum(axis=(0, 1))
        end = int(steps[-1])
        for i, s in enumerate(self.routers):
            if nf[i]:
                self._counters["nonfinite"] += int(nf[i])
                signals.append((end, "probes.nonfinite", float(nf[i]), s.layer))
                self._warn_once(f"nonfinite{s.layer}", "probes: non-finite router outputs on layer %d "
                                "(%d step/expert cells) in steps %d-%d (signal probes.nonfinite)",
                                s.layer, int(nf[i]), int(steps[0]), end)
            if invalid[i]:
                self._counters["invalid"] += int(invalid[i])
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
        with self._lock:
            self._finish_open_step()
            self._close_window()
        self._bg.wait()

    def metrics(self) -> dict:
        """Live ``{layer: LayerMetrics}`` of the current window (finished steps + the running one)."""
        with self._lock:
            data = self._rec.take(len(self._slot_steps), include_current=True)
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

    def latest_expert_counts(self) -> dict:
        """``{layer: [tokens per expert]}`` of the latest closed window (``chrono.exporters.live``)."""
        return {k: list(v) for k, v in self._latest_counts.items()}

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
            "steps": self._counters["steps"],
            "tokens_total": dict(self._tokens_total),
            "hook_seconds": self._hook_seconds,
            "hook_calls": self._hook_calls,
            "rows_written": dict(ws.rows_written),
            "write_errors": ws.write_errors + self._bg.errors,
            "rows_dropped": ws.rows_dropped + self._bg.rows_dropped,
            "nonfinite": self._counters["nonfinite"],
            "invalid_indices": self._counters["invalid"],
            "padding_excluded": self._counters["padding_excluded"],
            "optimizer_steps": self._clock.optimizer_steps,
            "faults": self._counters["faults"],
            "callback_errors": self._counters["callback_errors"],
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
        """Flush, remove every hook, close the writer. Safe to call twice."""
        if self._detached:
            return
        try:
            self._lock.acquire()
            if self._dist is None:
                self._finish_open_step()
                self._close_window()
            else:
                self._close_window()          # steps every rank ended with h.step(): reduced
                if self._dirty or self._clock.forward_pending:
                    # routing no h.step() ended on every rank: this rank's rows, no collective
                    self._advance(close=False)
                    self._close_window(reduce=False)
        except Exception as e:
            self._fault("detach", e)
        finally:
            self._lock.release()
            self._active = False
            self._detached = True
            self._clock.remove()
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
        self._counters["faults"] += 1
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


def attach(model: nn.Module, run: str, root=None, tokens: float = 0.0, flush_every: int = 50,
           lenses=None, distributed=None, metrics_port=None, generic: bool = True, specs=None,
           **options) -> Handle:
    """Hook every MoE router of ``model`` and record routing into run ``run`` under ``root``.

    ``root``: the store (default ``$CHRONO_ROOT``, else ``./chrono_runs``: the same as the
    CLI, dashboard and exporter). ``tokens``: 0 = aggregate counts only; a fraction in (0, 1]
    samples that share of tokens into the ``tokens`` table (``max_tokens_per_step`` bounds it
    per layer). ``flush_every``: steps per window (snapshot + write). ``lenses``: ``{layer:
    nn.Module}`` applied to that router's input. ``generic``: allow guessing routers when no
    adapter matches. ``specs``: ``[probes.RouterSpec(...)]`` for routers no adapter knows.

    Other options:

    * ``steps``: when a step ends (``probes.clock``): ``"auto"`` (default: one step per
      optimizer step once the model trains, one per top-level forward before that / in
      inference), ``"optimizer"``, ``"forward"``, ``"manual"`` (only ``h.step()``).
    * ``steps=<Handle>``: follow another handle's steps (attach a frozen reference model to its
      own run; its steps end when the policy's do, and take the same numbers).
    * ``start_step``: first step of this session. None (default) continues after the steps
      this rank already stored in the run (0 for a new run); a smaller value raises
      ``chrono.store.StoreError`` unless ``overwrite=True``, which first removes this rank's
      stored rows of steps ``>= start_step`` (a resume from an earlier checkpoint).
    * ``padding``: ``"exclude"`` (default: tokens masked out by a 2-D ``attention_mask`` of the
      forward are not counted; their number is kept as the ``probes.padding_excluded`` signal)
      or ``"count"``. ``h.set_mask(mask)`` supplies a mask for models without that argument.
    * ``metrics_expert_labels``: with ``metrics_port``, also serve per-expert shares.
    * ``max_tokens_per_step`` (4096), ``seed`` (0), ``config`` (dict for the manifest),
      ``auto_step=False`` (old spelling of ``steps="manual"``).

    Raises ``probes.ProbeError`` (no router, bad option) and ``chrono.store.StoreError`` (bad
    run id, run locked by another writer, step overlap).
    """
    return Handle(model, run, root=root, tokens=tokens, flush_every=flush_every, lenses=lenses,
                  distributed=distributed, metrics_port=metrics_port, generic=generic, specs=specs,
                  **options)


_guard_hooks_under_compile()
