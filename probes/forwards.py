"""Watching forwards, per thread: where a top-level forward starts and ends, and each stack's context.

* The attached model's pre/post hooks tell the step clock that a top-level forward
  starts (which may end the open step) and ends.
* Each stack's pre-hook captures the ``probes.context.ForwardContext`` its routers read
  (mode, token ids, positions, padding mask). A stack whose model hooks were bypassed
  (a wrapper called ``model.forward``, e.g. PEFT) acts as the top level; a later stack that
  starts right after it ended (an encoder-decoder's decoder after its encoder) continues the
  same forward instead of starting another (and so another step under ``steps="forward"``).
* ``h.set_mask(mask)`` is kept here for the next top-level forward of the same thread.

Fast paths (what runs once per forward was ~70 us of thread CPU in a 4-layer inference forward,
a quarter of the probes' in-hook time; in situ, right after the model's own work, a few lines of
Python cost several times what they cost in a hot loop): a stack call with nothing per token to
read (no sampled tokens, no ``h.set_mask``, no ``attention_mask`` under ``padding="exclude"``)
gives its routers the shared ``context.BARE[mode]`` instead of capturing a context, and a
forward's end with no staged or watched router call skips the flush and its lock
(``benchmarks/probe_overhead.py --base REF`` reports each hook's time, ``model_hooks_net_us``).

Hooks are closures over weak references (not bound methods), so ``copy.deepcopy(model)``
never copies the handle, and a copy's forwards are not recorded. They return None.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from . import context as C
from .faults import Faults
from .steps import Steps


class ForwardState(threading.local):
    """Per-thread state of the running forward: stack contexts, root mode, the user's mask."""

    def __init__(self, n_stacks: int):
        self.ctx: list = [None] * n_stacks   # ForwardContext of each stack's running call
        self.root_mode = None                 # mode of the running top-level forward
        self.pseudo_root = None               # stack acting as the top level (model hooks bypassed)
        self.pseudo_ended = None              # the last such stack, since its call ended
        self.user_mask = None                 # h.set_mask(): for the next top-level forward
        self.mask_used = False


class Forwards:
    """Top-level forward start/end for the step clock, and the per-thread ``ForwardState``."""

    def __init__(self, stack_paths: list[str], steps: Steps, faults: Faults, exclude_padding: bool,
                 per_token: bool = False):
        self.stack_paths = stack_paths
        self.tls = ForwardState(len(stack_paths))   # threaded serving: one request's mask never
        self.steps = steps                          # applies to another's
        self.exclude_padding = exclude_padding
        self.per_token = per_token   # tokens are sampled: routers read ids and positions
        self._stage = steps.window.rec.stage   # the recorder's staged calls (never replaced)
        self._faults = faults

    def starts(self, mode: int) -> None:
        self.tls.pseudo_ended = None
        if self.steps.clock.forward_starts(mode, self.steps.current, self.steps.loose):
            self.steps.advance()
        self.tls.root_mode = mode

    def ends(self) -> None:
        stage = self._stage
        if stage.calls or stage.watch:   # (read without the lock: a call staged after this read is
            self.steps.flush_staged(threading.get_ident())   # another thread's, whose forward runs)
        st = self.tls
        st.root_mode = None
        if st.user_mask is not None and not st.mask_used:
            self._faults.warn_once("mask-unused", "probes: h.set_mask(mask) of shape %s matched no "
                                   "[batch, seq] of the forward; nothing was excluded",
                                   tuple(st.user_mask.shape))
        st.user_mask, st.mask_used = None, False
        self.steps.clock.forward_pending = True

    def set_mask(self, mask) -> None:
        self.tls.user_mask, self.tls.mask_used = mask, False

    def install(self, model: nn.Module, handle, hooks) -> None:
        """Root hooks first (they see the top-level forward before any stack or router), then stacks.

        ``hooks``: the handle's ``chrono.hooks.HookRegistry``.
        """
        root_pre, root_post = _root_hooks(weakref.ref(handle), model)
        hooks.pre(model, root_pre, with_kwargs=True)
        hooks.forward(model, root_post, always_call=True)
        for i, path in enumerate(self.stack_paths):
            stack = model.get_submodule(path) if path else model
            pre, post = _stack_hooks(weakref.ref(handle), i, stack)
            hooks.pre(stack, pre, with_kwargs=True)
            hooks.forward(stack, post, always_call=True)


def _root_hooks(handle_ref, model: nn.Module):
    model_ref = weakref.ref(model)

    @torch._dynamo.disable
    def root_pre(module, args, kwargs):
        h = handle_ref()
        if h is None or not h._active or module is not model_ref() or C.in_backward():
            return None
        h._fwd.starts(C.forward_mode(module))
        return None

    @torch._dynamo.disable
    def root_post(module, args, output):
        h = handle_ref()
        if h is not None and h._active and module is model_ref() and not C.in_backward():
            h._fwd.ends()
        return None

    return root_pre, root_post


def _stack_hooks(handle_ref, i: int, stack: nn.Module):
    stack_ref = weakref.ref(stack)
    names = C.positional_params(stack)
    ids_index = C.ids_index(names)

    @torch._dynamo.disable
    def stack_pre(module, args, kwargs):
        h = handle_ref()
        if h is None or not h._active or module is not stack_ref() or C.in_backward():
            return None   # (a deep copy of the model carries this hook: it records nothing)
        fwd = h._fwd
        st = fwd.tls
        try:
            if st.root_mode is None and st.pseudo_root is None:
                # the model's own forward hooks were bypassed (a wrapper called model.forward,
                # e.g. PEFT): this stack's call is the top-level forward
                st.pseudo_root = i
                if st.pseudo_ended is not None and i > st.pseudo_ended:
                    # a later stack of the same call (encoder, then decoder): the same forward
                    st.pseudo_ended, st.root_mode = None, C.forward_mode(module)
                else:
                    fwd.starts(C.forward_mode(module))
            mode = st.root_mode if st.root_mode is not None else C.forward_mode(module)
            if len(args) > 1 and names:   # (the mask, cache, ... given by position: read by name)
                kwargs = C.by_name(names, args, kwargs)
            if not fwd.per_token and st.user_mask is None and (
                    not fwd.exclude_padding or kwargs.get("attention_mask") is None):
                st.ctx[i] = C.BARE[mode]   # no mask to apply and no token sampled: the mode is all
                return None                # the routers read (capture would find nothing more)
            st.ctx[i] = ctx = C.capture(module, args, kwargs, mode, ids_index, fwd.exclude_padding,
                                        user_mask=st.user_mask)
            st.mask_used = st.mask_used or ctx.used_user_mask
        except Exception as e:
            st.ctx[i] = None
            h._faults.fault("forward context", e)
        return None

    @torch._dynamo.disable
    def stack_post(module, args, output):
        h = handle_ref()
        if h is None or module is not stack_ref() or C.in_backward():
            return None
        st = h._fwd.tls
        st.ctx[i] = None
        if st.pseudo_root == i:
            st.pseudo_root = None
            h._fwd.ends()
            st.pseudo_ended = i
        return None

    return stack_pre, stack_post
