"""The hot path: the forward hook on each router (DESIGN §5).

Hot path (a router already staged, ``probes.staging``; a call of a running top-level
forward, not under ``inference_mode`` or ``torch.compile``, no padding mask, no sampled
tokens): parse the router's own output into a ``probes.routing.Routed`` (the adapter's
``parse``), read the router's expert count (lifecycle may change it before the forward ends;
``Window.saw`` when it exceeds the window's widest: it may grow the recorder) and stage a
reference (``Stage.push``, under the lock), nothing else; counting waits for the forward's end
(``Stage.flush``). A call ``push`` refuses takes the general path with its parse. Inference
calls take the general path: staging their copies from the hot path measured no faster
(``benchmarks/probe_overhead.py --layers 12 --modes infer --base``: +0.06 ms per forward of 12
calls, net of an A/A run of identical code).

Second hot path, on CPU with ``probes.native`` built (``Recorder.native``): a call of a running
top-level forward that is counted at once anyway (under ``inference_mode``, or a router counted
at once for good), without padding mask or sampled tokens, is parsed and counted in one C call
(``Recorder.count_native``), nothing else; a call C cannot read goes on to the general path.

Otherwise, per call: parse, read the expert count (as above), pick the forward's context
(mode, padding mask) from the stack's ``ForwardState``, and stage the call or, with a
padding mask, capacity drops, under
``torch.compile``, on probation or under ``inference_mode`` in a model with few routers,
count it at once (``Recorder.record``: device ``index_add_``, no host sync); when tokens are
sampled, a staged call is sampled when the flush counts it (``Stage._sample``, in one loop over
the forward's calls), any other call here (``TokenSampler.sample``). Returns None (a value would replace the
router's output). Anything that can be looked up once is bound when the hook is built; a
failure is a telemetry fault, never an exception in the forward. A call in a backward (an
activation recompute: after the forward, or inside it when the forward itself takes a gradient,
``torch.autograd.grad`` of an input-gradient penalty) is not counted, on every path: its tokens
were counted when the forward called the router (``in_backward``, ~80 ns, before both hot paths).
A call on ``meta`` tensors (a shape or FLOP-count dry run) has no data and is not counted: the
recorder, which follows the routers' outputs to their device, must not move to ``meta``. The hot
paths do not test for it (that attribute read cost ~8 us a call in situ,
``benchmarks/probe_overhead.py``): C refuses a meta call (the general path drops it) and a staged
one is dropped when the flush reads it (``Stage.flush``).
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
from .staging import EAGER, INFER, STAGED

log = logging.getLogger("probes")


def router_hook(handle, site: RouterSite, slot: int, stack: int):
    """The forward hook of router ``site`` (recorder slot ``slot``, stack index ``stack``)."""
    window, steps, fwd, faults = handle._window, handle._steps, handle._fwd, handle._faults
    rec, sampler, lock = window.rec, window.sampler, handle._lock
    handle_ref, router_ref = weakref.ref(handle), site._module
    state, push, parse, experts_of = rec.stage.state, rec.stage.push, site.parse, site.experts_of
    count_key = site.count_key   # (experts_of's first lines, inlined: ~9 us per call saved in situ)
    is_compiling, in_backward, clock = torch.compiler.is_compiling, C.in_backward, time.perf_counter

    def on_router_output(module, args, output):
        h = handle_ref()
        if h is None or not h._active or module is not router_ref():
            return None   # detached, or a deep copy of the model that carries this hook
        compiling = is_compiling()
        if not compiling and in_backward():
            return None   # activation recompute: these tokens were counted in the forward
        st = fwd.tls
        mode, routed = st.root_mode, None
        if mode is not None and sampler is None and not compiling and (
                mode != INFER and state[slot] == STAGED or rec.native is not None and (
                    mode == INFER or state[slot] == EAGER)):
            ctx = st.ctx[stack]
            if ctx is None or ctx.keep is None:
                # the hot paths: a staged router's call in a running forward (a reference), or
                # on CPU a call counted at once (one C call), nothing per token
                t0 = clock()
                try:
                    routed = parse(module, args, output)
                    n = module.__dict__.get(count_key)   # now: lifecycle may change it before
                    if n.__class__ is not int:             # the forward ends
                        n = experts_of(module)
                    with lock:
                        if n > window.widest[slot]:   # (rare: a new window, or lifecycle growth)
                            window.saw(slot, n)
                        if mode != INFER and state[slot] == STAGED:
                            done = push(mode, slot, routed)
                        else:   # (False: a tensor C cannot read, left to the general path)
                            done = rec.native is not None and rec.count_native(mode, slot, routed)
                except Exception as e:  # telemetry must never break the forward
                    faults.fault(f"router {site.name}", e)
                    done = True
                if done:
                    steps.dirty = True
                    h._hook_seconds += clock() - t0
                    h._hook_calls += 1
                    return None
        t0 = 0.0 if compiling else clock()
        try:
            if routed is None:   # (else the hot path parsed it and handed it over: parsed once)
                routed = parse(module, args, output)
            if routed.indices.is_meta:
                return None   # a dry run on meta: the recorder must not follow it to meta
            ctx = st.ctx[stack]
            if ctx is None:
                mode = st.root_mode if st.root_mode is not None else mode_index(module)
            else:
                mode = ctx.mode
                if ctx.keep is not None or sampler is not None:   # something per token is used
                    ctx = _token_context(ctx, routed, site, slot, faults)
            steps.dirty = True
            if not compiling and st.root_mode is None and st.pseudo_root is None:
                steps.loose = True   # outside any forward seen to start: the next forward is a new step
            mask, pad = (ctx.keep, ctx.pad) if ctx is not None and ctx.keep is not None else (None, None)
            # in-place adds from two threads would race: serialise them; a lock cannot be traced,
            # so compiled code runs unguarded and counts at once (compiled serving from threads:
            # unsupported). Only a call of a running top-level forward can be staged.
            n = module.__dict__.get(count_key)   # lifecycle may grow or prune experts
            if n.__class__ is not int:
                n = experts_of(module)
            with contextlib.nullcontext() if compiling else lock:
                if n > window.widest[slot]:   # under the lock: another thread may flush
                    window.saw(slot, n)
                # a staged call is sampled when the flush counts it (never staged when compiling)
                staged = rec.add(mode, slot, routed, mask, pad, in_forward=not compiling and (
                    st.root_mode is not None or st.pseudo_root is not None),
                    sample=None if sampler is None or compiling else (site.layer, ctx))
                if sampler is not None and not staged:
                    if not compiling:   # the layer's staged calls first: sampled in call order
                        rec.stage.before_sampling(site.layer)
                    sampler.sample(site.layer, mode, routed.indices, routed.weights, routed.dropped, ctx)
        except Exception as e:  # telemetry must never break the forward
            faults.fault(f"router {site.name}", e)
        if not compiling:
            h._hook_seconds += clock() - t0
            h._hook_calls += 1
        return None

    return on_router_output


def _token_context(ctx, routed, site, slot, faults):
    """``ctx`` for a call whose forward has a padding mask or sampled tokens, if the router saw
    its batch x sequence tokens; else None (no mask, ids or positions for it), warned once."""
    idx = routed.indices   # [T, k], or [B, S, k] from a native router (tokens row-major)
    tokens = idx.shape[0] if idx.dim() <= 2 else idx.numel() // max(1, idx.shape[-1])
    if ctx.n_tokens != tokens:
        faults.warn_once(f"ctx{slot}", "probes: router %s saw %d tokens, not batch x sequence = %s "
                         "of its forward: no padding mask, token ids or positions for it",
                         site.name, tokens, ctx.n_tokens)
        return None
    return ctx


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
