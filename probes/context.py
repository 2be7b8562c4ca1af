"""What a router call needs to know about the forward it runs in: mode, tokens, padding, positions.

A *stack* is the module whose ``forward`` receives the token ids of a group of
routers: the deepest ancestor of the router whose signature has an
``input_ids`` parameter (a decoder-only base model, a T5/Switch encoder or
decoder stack), else the attached model itself. A forward pre-hook on each
stack captures, per call, a ``ForwardContext``:

* ``ids``: ``[B, S]`` token ids as the stack received them (for a Switch
  decoder that is the shifted ``labels`` when only ``labels=`` was given);
  None when the stack got ``inputs_embeds`` (token ids unknown -> NULL).
* ``positions``: ``[S]`` absolute positions of these tokens: ``cache_position``
  when given, else ``past + arange(S)`` with ``past`` the length of the KV cache
  the forward got (``cache=`` in transformers 5, ``past_key_values=`` before),
  else the part of a 2-D attention mask longer than ``S``.
* ``keep``: ``[B*S]`` float64, 1 for tokens that count and 0 for padding,
  from a 2-D ``attention_mask`` (its last ``S`` columns, the current tokens), else
  from a 4-D one (``generate`` with a static cache: ``_keep_from_4d``);
  ``pad`` is the number of padding tokens (0-d tensor). None: count all.

A router that sees ``T == B*S`` tokens (indices ``[T, k]``, or ``[B, S, k]`` from a native
router: ``B*S`` tokens) maps token ``p`` to batch ``p // S`` and
position ``positions[p % S]`` (the row-major flattening every HF MoE block
uses). A router that sees another number of tokens gets no mask and flat
positions, and the handle warns once.

All work here is a few device ops per top-level forward (no host sync).
"""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .recorder import EVAL, INFER, TRAIN, mode_index

_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (activation recompute happens there)."""
    return torch._C._current_graph_task_id() != -1


def _in_reentrant_checkpoint() -> bool:
    """True inside the first (no-grad) forward of ``torch.utils.checkpoint(use_reentrant=True)``."""
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if code.co_name == "forward" and code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        f = f.f_back
    return False


def forward_mode(module: nn.Module) -> int:
    """TRAIN / EVAL / INFER of a top-level forward.

    INFER under ``torch.inference_mode()``; TRAIN when ``module.training`` and
    grad is enabled, or when grad is off only because a reentrant activation
    checkpoint runs its first forward; EVAL otherwise.
    """
    mode = mode_index(module)
    if mode == EVAL and module.training and _in_reentrant_checkpoint():
        return TRAIN
    return mode


@dataclass
class ForwardContext:
    mode: int
    ids: Optional[torch.Tensor] = None        # [B, S] long, or None
    batch: Optional[int] = None
    seq: Optional[int] = None
    positions: Optional[torch.Tensor] = None  # [S] long (absolute), or None = arange(S)
    keep: Optional[torch.Tensor] = None       # [B*S] float64, or None = count all
    pad: Optional[torch.Tensor] = None        # 0-d float64: padding tokens in this forward
    used_user_mask: bool = False              # the keep mask came from h.set_mask

    @property
    def n_tokens(self) -> Optional[int]:
        return None if self.batch is None or self.seq is None else self.batch * self.seq


# the context of a stack call when nothing per token is read (no padding mask applies, no token
# is sampled): one shared instance per mode, never written (capture builds its own)
BARE = {m: ForwardContext(m) for m in (TRAIN, EVAL, INFER)}


def positional_params(module: nn.Module) -> tuple:
    """Names of ``forward``'s parameters that take a positional argument, in order (() if its
    signature cannot be read)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def ids_index(names: tuple) -> Optional[int]:
    """Position of ``input_ids`` among ``forward``'s positional parameter ``names``
    (``positional_params``), None if it has none."""
    return names.index("input_ids") if "input_ids" in names else None


def by_name(names: tuple, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` with the positional ``args`` added under their parameter ``names`` (a stack
    called as ``backbone(input_ids, attention_mask)`` gives its mask, cache, ... by position)."""
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


def find_stacks(model: nn.Module, router_names: list[str]) -> tuple[list[str], list[int]]:
    """Stack paths ("" = the model) and, per router, the index of its stack in that list."""
    has_ids = {}
    paths: list[str] = []
    of_router: list[int] = []
    for name in router_names:
        parts = name.split(".")
        chosen = ""
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix not in has_ids:
                has_ids[prefix] = ids_index(positional_params(model.get_submodule(prefix))) is not None
            if has_ids[prefix]:
                chosen = prefix
                break
        if chosen not in paths:
            paths.append(chosen)
        of_router.append(paths.index(chosen))
    return paths, of_router


def capture(module: nn.Module, args: tuple, kwargs: dict, mode: int, ids_index: Optional[int],
            exclude_padding: bool, user_mask=None) -> ForwardContext:
    """Build the ForwardContext of one stack call from its arguments (see the module docstring).

    ``user_mask`` (``h.set_mask``) stands in for a missing ``attention_mask`` only when its shape
    is exactly this call's ``[B, S]``; it never moves positions.
    """
    ids = kwargs.get("input_ids")
    if ids is None and ids_index is not None and len(args) > ids_index:
        ids = args[ids_index]
    if ids is None and ids_index is None and args and torch.is_tensor(args[0]) \
            and not torch.is_floating_point(args[0]):
        ids = args[0]   # a model without an input_ids parameter called as model(token_ids)
    emb = kwargs.get("inputs_embeds")
    ctx = ForwardContext(mode)
    if torch.is_tensor(ids) and ids.dim() == 2 and not torch.is_floating_point(ids):
        ctx.ids, ctx.batch, ctx.seq = ids, int(ids.shape[0]), int(ids.shape[1])
    elif torch.is_tensor(emb) and emb.dim() == 3:
        ctx.batch, ctx.seq = int(emb.shape[0]), int(emb.shape[1])
    elif args and torch.is_tensor(args[0]) and args[0].dim() >= 2:
        ctx.batch, ctx.seq = int(args[0].shape[0]), int(args[0].shape[1])
    else:
        return ctx
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):   # per layer type (models with sliding-window layers): the full one first
        mask4 = [m for k, m in sorted(mask.items(), key=lambda kv: kv[0] != "full_attention")
                 if torch.is_tensor(m) and m.dim() == 4]
    else:
        mask4 = [mask] if torch.is_tensor(mask) and mask.dim() == 4 else []
    if not (torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == ctx.batch
            and mask.shape[1] >= ctx.seq):
        mask = None
    keep_mask = mask
    if mask is None and user_mask is not None and tuple(user_mask.shape) == (ctx.batch, ctx.seq):
        keep_mask = user_mask
        ctx.used_user_mask = True
    cache_pos = kwargs.get("cache_position")
    if torch.is_tensor(cache_pos) and cache_pos.dim() == 1 and cache_pos.shape[0] == ctx.seq:
        ctx.positions = cache_pos
    else:
        past = _cache_length(kwargs)
        if past is None:
            past = int(mask.shape[1]) - ctx.seq if mask is not None else 0
        if past:
            ctx.positions = torch.arange(past, past + ctx.seq, device=_device(ids, emb, mask))
    keep = None
    if exclude_padding and keep_mask is not None:
        keep = (keep_mask[:, -ctx.seq:] != 0).reshape(-1).to(torch.float64)
    elif exclude_padding and mask4 and (layout := _key_layout(kwargs)):
        for m4 in mask4:
            keep = _keep_from_4d(m4, ctx, layout == "cache")
            if keep is not None:
                break
    if keep is not None:
        ctx.keep = keep
        ctx.pad = keep.numel() - keep.sum()
    return ctx


def _key_layout(kwargs: dict):
    """Where a 4-D mask keeps a token's key: "cache" (a cache that reports its length and is not
    paged: at its absolute position, ``cache_position`` or the cache length + its index), "none"
    (no cache: at its index), or None (unknown: packed sequences, ``cu_seq_lens_*`` of continuous
    batching, or a paged cache, which puts each sequence's keys in blocks of its own)."""
    if any(k.startswith(("cu_seq_lens", "cu_seqlens")) and v is not None for k, v in kwargs.items()):
        return None
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            ok = hasattr(cache, "get_seq_length") and "paged" not in type(cache).__name__.lower()
            return "cache" if ok else None
    return "none"


def _keep_from_4d(mask, ctx: ForwardContext, cached: bool):
    """``[B*S]`` float64 keep mask from a 4-D attention mask ``[B, 1 or heads, S or 1, K]``
    (``generate`` with a static cache passes one instead of the 2-D mask: bool, True = attend, or
    additive float, 0 = attend), or None when its shape does not fit this call. Token ``j`` of
    row ``b`` counts when its own key (index ``positions[j]``, the cache slot of an absolute
    position, else ``j`` when there are ``S`` keys; only for the layouts ``_key_layout``
    knows, ``cached``: a cache that reports its length) is attended by its own query: a padding token's key is attended by
    nobody, left or right padding. A token whose key index is past ``K`` (a rolling
    sliding-window cache) counts, as without a mask. Device ops only (no host sync)."""
    B, S = ctx.batch, ctx.seq
    if mask.shape[0] != B or mask.shape[2] not in (S, 1) or mask.shape[-1] == 0 \
            or (not cached and ctx.positions is None and mask.shape[-1] != S):   # keys laid out otherwise
        return None
    K = mask.shape[-1]
    keys = (ctx.positions if ctx.positions is not None else torch.arange(S)).to(mask.device).reshape(1, S, 1)
    rows = mask[:, 0].expand(B, S, K)                                   # query j's row: [B, S, K]
    own = rows.gather(2, keys.clamp(max=K - 1).expand(B, S, 1)).reshape(-1)
    if own.dtype == torch.bool:
        attend = own
    elif torch.is_floating_point(own):
        attend = own > torch.finfo(own.dtype).min / 2    # additive: 0 (or a bias) vs a large negative
    else:
        attend = own != 0
    # a key past the mask (a rolling sliding-window cache): that token counts (no host sync to ask)
    return (attend | (keys >= K).expand(B, S, 1).reshape(-1)).to(torch.float64)


CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")   # transformers 5.x / 4.x names


def _cache_length(kwargs: dict):
    """Tokens already in the KV cache the forward got (host-side int), or None without a cache."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            try:
                return int(cache.get_seq_length())
            except Exception:
                return None
    return None


def _device(*ts):
    for t in ts:
        if torch.is_tensor(t):
            return t.device
    return None
