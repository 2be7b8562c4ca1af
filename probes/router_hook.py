"""The hot path: the forward hook on each router (DESIGN §5).

Per router call: parse the router's own output into a ``probes.routing.Routed`` (the
adapter's ``parse``), pick the forward's context (mode, padding mask) from the stack's
``ForwardState``, and hand both to ``Recorder.record`` (device ``scatter_add_``, no host
sync) and, when tokens are sampled, to ``TokenSampler.sample``. Returns None (a value
would replace the router's output). Anything that can be looked up once is bound when
the hook is built; a failure is a telemetry fault, never an exception in the forward.
"""
from __future__ import annotations

import contextlib
import logging
import time
import weakref

import torch

from . import context as C
from .discovery import RouterSite
from .recorder import mode_index

log = logging.getLogger("probes")


def router_hook(handle, site: RouterSite, slot: int, stack: int):
    """The forward hook of router ``site`` (recorder slot ``slot``, stack index ``stack``)."""
    window, steps, fwd, faults = handle._window, handle._steps, handle._fwd, handle._faults
    rec, sampler, lock = window.rec, window.sampler, handle._lock
    handle_ref, router_ref = weakref.ref(handle), site._module

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
            if n > window.widest[slot]:  # a lifecycle shrink must not cut this window's counts
                window.widest[slot] = n
            if routed.indices.device != rec.device:
                rec.to(routed.indices.device)
            st = fwd.tls
            ctx = st.ctx[stack]
            if ctx is not None and ctx.n_tokens != routed.indices.shape[0]:
                if ctx.keep is not None or sampler is not None:   # only then is something lost
                    faults.warn_once(f"ctx{slot}", "probes: router %s saw %d tokens, not batch x "
                                     "sequence = %s of its forward: no padding mask, token ids or "
                                     "positions for it", site.name, routed.indices.shape[0], ctx.n_tokens)
                mode, ctx = ctx.mode, None
            else:
                mode = ctx.mode if ctx is not None else (
                    st.root_mode if st.root_mode is not None else mode_index(module))
            steps.dirty = True
            mask, pad = (ctx.keep, ctx.pad) if ctx is not None and ctx.keep is not None else (None, None)
            # in-place adds from two threads would race: serialise them (~0.1 us); a lock cannot
            # be traced, so compiled code runs unguarded (compiled serving from threads: unsupported)
            with contextlib.nullcontext() if compiling else lock:
                rec.record(mode, slot, routed, mask, pad)
                if sampler is not None:
                    sampler.sample(site.layer, mode, routed.indices, routed.weights, routed.dropped, ctx)
        except Exception as e:  # telemetry must never break the forward
            faults.fault(f"router {site.name}", e)
        if not compiling:
            h._hook_seconds += time.perf_counter() - t0
            h._hook_calls += 1
        return None

    return on_router_output


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


_guard_hooks_under_compile()
