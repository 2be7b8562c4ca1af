"""Per-token sampling into the ``tokens`` table, bounded per step.

For a router call over ``T`` tokens with rate ``p`` we take ``n = min(ceil(p*T),
budget)`` tokens by systematic sampling: positions ``off + i*stride`` with
``stride = T // n`` and a random offset (no host sync; each token's inclusion
probability is n / (n*stride), uniform over the first n*stride tokens). The
i-th call of every layer in a step uses the same random word, so at equal token
counts all layers sample the same tokens. The budget is ``max_tokens_per_step``
per layer per step, counted on the host from shapes only. Sampled values stay on
the device until the window is flushed, then are copied to the host in two
concatenated copies.

Under ``torch.compile`` sampling is traced into the graph (no graph break; issue
19): the offset is a tensor op on random words that ``end_step`` redraws in
place on the device once per step (``Tensor.random_`` with the sampler's own
generator, outside any compiled region), so no generator is created or
advanced inside the graph. Same seed, same samples, eager or compiled.

Eager on CPU the random words are host memory: the offset is read there and the
sampled tokens are a strided slice, so a call costs one ``cat`` of the sampled
int columns (experts, token ids, drops, padding) and one copy of the weights;
batch indices and positions are computed from ``(offset, stride, S)`` when the
window is written (on CUDA or compiled: ~12 device ops per call, as above).
Measured on CPU (small HF Mixtral, 8 x 128 tokens, 1 %): the tensor path cost 170-200 us
per router call in situ; with the host path the whole in-hook time with sampling is
0.73-0.78x what it was (``benchmarks/probe_ab.py --tokens 0.01``, 4 and 32 layers).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .recorder import _unwrap

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

OFFSET_SLOTS = 64  # random words per step: router calls of one layer beyond 64 in a step reuse them
N_INT_COLS = 10  # step, layer, mode, batch_idx, position, k, expert, token_id (-1: none), dropped, padding


class TokenSampler:
    def __init__(self, rate: float, max_tokens_per_step: int, seed: int = 0, device=None):
        if not (0.0 < rate <= 1.0):
            raise ValueError("tokens must be 0 (off) or a fraction in (0, 1]")
        if max_tokens_per_step < 1:
            raise ValueError("max_tokens_per_step must be >= 1")
        self.rate = float(rate)
        self.max_tokens_per_step = int(max_tokens_per_step)
        self.seed = int(seed)
        self._used: dict[int, int] = {}
        self._calls: dict[int, int] = {}     # router calls per layer in the open step
        self._pending: list = []
        self._ready: list = []
        self.sampled = 0
        self._draw_on(torch.device(device or "cpu"))

    @torch._dynamo.disable
    def _draw_on(self, device) -> None:
        """(Re)create the generator and the step's random words on ``device`` (at init, or when the
        model moved: the only place a generator is created, never inside a compiled region)."""
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(self.seed)
        with torch.inference_mode(False):   # redrawn in place at every step, in any mode
            self._rand = torch.empty(OFFSET_SLOTS, dtype=torch.int64, device=device)
        self._host = self._rand.numpy() if device.type == "cpu" else None   # the same memory
        self._ctx_columns = None   # (ForwardContext, device, its columns): _columns
        self._redraw()

    def _redraw(self) -> None:
        # one device op per step: new random words for the next step's calls (no host sync)
        self._rand.random_(0, 2 ** 62, generator=self._gen)

    def sample(self, layer: int, mode: int, indices, weights=None, dropped=None, ctx=None) -> None:
        """Sample this router call's tokens. ``ctx``: the ``probes.context.ForwardContext`` of the
        call when it describes these tokens (``T == B*S``), else None (flat positions, no ids)."""
        if not torch.compiler.is_compiling() and _is_wrapped(indices):
            self._sample_unwrapped(layer, mode, indices, weights, dropped, ctx)
            return
        idx = indices.detach()
        if idx.dim() != 2:   # [B, S, k] -> [B*S, k] (row-major tokens); [T] -> [T, 1]
            idx = idx.reshape(-1, idx.shape[-1]) if idx.dim() > 2 else idx.reshape(-1, 1)
        T, k = idx.shape
        if T == 0:
            return
        budget = self.max_tokens_per_step - self._used.get(layer, 0)
        n = min(math.ceil(self.rate * T), budget, T)
        if n <= 0:
            return
        self._used[layer] = self._used.get(layer, 0) + n
        stride = T // n
        dev = idx.device
        # the i-th call of every layer in a step shares one offset, so all layers sample the same
        # tokens (layer-to-layer analyses can follow a token) while each token stays equally likely
        call = self._calls.get(layer, 0)
        self._calls[layer] = call + 1
        if self._rand.device != dev:
            self._draw_on(dev)
        if self._host is not None and not torch.compiler.is_compiling():
            self._sample_host(layer, mode, idx, n, stride, call, weights, dropped, ctx)
            return
        # offset in [0, stride): the step's random word of this call index modulo the stride
        # (2**62 words: the modulo bias is < stride / 2**62); a tensor op, so it stays in the graph
        off = torch.remainder(self._rand[call % OFFSET_SLOTS], stride)
        pos = torch.arange(n, device=dev).mul_(stride).add_(off)      # [n]
        if ctx is not None:
            seq = ctx.seq
            col = torch.remainder(pos, seq)
            where = [torch.div(pos, seq, rounding_mode="floor"),
                     col if ctx.positions is None else ctx.positions.to(dev)[col].long()]
        else:
            where = [torch.zeros_like(pos), pos]
        parts = where + [idx[pos].reshape(-1)]
        has_tid = ctx is not None and ctx.ids is not None
        if has_tid:
            parts.append(ctx.ids.reshape(-1).to(device=dev, dtype=torch.int64)[pos])
        if dropped is not None:
            parts.append(dropped.detach().reshape(T, -1)[pos].reshape(-1).to(torch.int64))
        has_mask = ctx is not None and ctx.keep is not None
        if has_mask:
            parts.append((ctx.keep.to(dev)[pos] == 0).to(torch.int64))
        ints = torch.cat(parts)  # one small device tensor per call; columns are built on the host
        w = None if weights is None else weights.detach().reshape(T, -1)[pos].reshape(-1).float()
        self._pending.append([None, layer, mode, n, k, has_tid, dropped is not None, has_mask, ints, w, None])
        self.sampled += n

    def _sample_unwrapped(self, layer, mode, indices, weights, dropped, ctx) -> None:
        """``sample`` for a call inside a ``torch.func`` transform: its outputs are wrapped
        tensors, which must not outlive the transform (the window's write would fail, losing
        every row of it). Under ``grad`` / ``jacrev`` (wrappers of the same values) the call is
        sampled from the unwrapped tensors; under ``vmap`` (one call for a batch of forwards)
        it is not sampled: ValueError, a telemetry fault (its counts are kept)."""
        plain = _unwrap(indices)
        if plain.numel() != indices.numel():
            raise ValueError("token sampling skips router calls inside torch.func.vmap (their counts are kept)")
        with torch._C._DisableFuncTorch():
            self.sample(layer, mode, plain, _unwrap(weights), _unwrap(dropped), ctx)

    def _sample_host(self, layer, mode, idx, n, stride, call, weights, dropped, ctx) -> None:
        """``sample`` for ``idx`` ``[T, k]`` on CPU, eager: the offset is read from the host
        words (the value the tensor path computes), tokens ``off + i * stride`` are the slice
        ``off::stride``; one ``cat`` copies the int columns ``[n, k (+1 token id) (+k dropped)
        (+1 padding)]``, one ``to`` the weights ``[n, k]`` float32. What a forward's calls
        share (flat token ids and padding flags as ``[B*S, 1]`` columns, host positions) is
        prepared once per ``ctx`` (``_columns``)."""
        T, k = idx.shape
        off = int(self._host[call % OFFSET_SLOTS]) % stride
        rows = slice(off, off + n * stride, stride)
        cols = [idx[rows]]
        tid, pad, positions = (None, None, None) if ctx is None else self._columns(ctx, idx.device)
        if tid is not None:
            cols.append(tid[rows])
        if dropped is not None:
            drop = dropped.detach().reshape(T, -1)[rows]
            if drop.is_floating_point():   # (in the cat, a float column would make every column
                drop = drop.to(torch.int64)  # float: bfloat16 rounds token ids above 256)
            cols.append(drop)
        if pad is not None:
            cols.append(pad[rows])
        ints = torch.cat(cols, 1) if len(cols) > 1 else idx[rows].to(torch.int64, copy=True)
        if weights is not None:
            weights = weights.detach()
            if weights.dim() != 2 or weights.shape[0] != T:   # ([T*k, 1], [1, T*k]...: paired with
                weights = weights.reshape(T, -1)               # the indices in flat order)
        w = None if weights is None else weights[rows].to(torch.float32, copy=True)
        where = (off, stride, None if ctx is None else ctx.seq, positions)
        self._pending.append([None, layer, mode, n, k, tid is not None, dropped is not None, pad is not None,
                              ints, w, where])
        self.sampled += n

    def _columns(self, ctx, device) -> tuple:
        """``(token ids [B*S, 1] int64 or None, padding flags [B*S, 1] bool or None, positions
        [S] int64 host array or None)`` of forward context ``ctx``, made at its first sampled
        call and kept for the next calls with the same ``ctx`` (the forward's; positions are
        copied to the host then, as the next forward may bring others)."""
        cached = self._ctx_columns
        if cached is not None and cached[0] is ctx and cached[1] == device:
            return cached[2]
        tid = None if ctx.ids is None else ctx.ids.reshape(-1, 1).to(device=device, dtype=torch.int64)
        pad = None if ctx.keep is None else ctx.keep.reshape(-1, 1).to(device) == 0
        positions = None if ctx.positions is None else ctx.positions.to("cpu", torch.int64, copy=True).numpy()
        self._ctx_columns = (ctx, device, (tid, pad, positions))
        return self._ctx_columns[2]

    def restep(self, from_step: int) -> None:
        """Finished steps >= ``from_step`` become part of the open step again (step merge)."""
        back = [e for e in self._ready if e[0] >= from_step]
        if back:
            self._ready = [e for e in self._ready if e[0] < from_step]
            self._pending = self._within_budget(back + self._pending)

    def _within_budget(self, entries: list) -> list:
        """``entries`` of one (merged) step, in call order, cut to ``max_tokens_per_step`` tokens
        per layer: first come, first served, as in one step; an entry over the rest of its layer's
        budget keeps every ``q``-th of its tokens (``q = n // rest``: still a systematic sample,
        of stride ``q * stride``). ``_used`` and ``_calls`` then count what was kept."""
        used: dict[int, int] = {}
        calls: dict[int, int] = {}
        kept = []
        for e in entries:
            layer, n = e[1], e[3]
            rest = self.max_tokens_per_step - used.get(layer, 0)
            if rest <= 0:
                self.sampled -= n
                continue
            if n > rest:
                e = _thin(e, n // rest, rest)
                self.sampled -= n - rest
            used[layer] = used.get(layer, 0) + e[3]
            calls[layer] = calls.get(layer, 0) + 1
            kept.append(e)
        self._used, self._calls = used, calls
        return kept

    def end_step(self, step: int) -> None:
        for entry in self._pending:
            entry[0] = step
        self._ready.extend(self._pending)
        self._pending = []
        self._used = {}
        self._calls = {}
        self._redraw()

    def take(self) -> tuple[np.ndarray, np.ndarray] | None:
        """All finished steps' rows as host arrays, or None (``token_rows(detach_ready())``)."""
        return token_rows(self.detach_ready())

    def detach_ready(self) -> list | None:
        """Hand over the finished steps' sampled entries (device tensors of their own, never
        reused), or None: O(1), for ``token_rows`` on another thread."""
        if not self._ready:
            return None
        ready, self._ready = self._ready, []
        return ready


def token_rows(ready: list | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows of ``TokenSampler.detach_ready()`` entries as host arrays, or None.

    Two device->host copies (all int parts, all weights), then the columns
    (step, layer, mode, batch_idx, position, k, expert, token_id, dropped,
    padding) are built with NumPy from each call's metadata. ``token_id`` -1
    means unknown (written as NULL).
    """
    if not ready:
        return None
    ints = torch.cat([e[8].reshape(-1).to(torch.int64) for e in ready]).to("cpu", copy=True).numpy()
    ws = [e[9].reshape(-1) for e in ready if e[9] is not None]
    wts = torch.cat(ws).to("cpu", copy=True).numpy() if ws else np.zeros(0, np.float32)
    out, wout, io, wo = [], [], 0, 0
    for step, layer, mode, n, k, has_tid, has_drop, has_mask, _, w, where in ready:
        if where is not None:   # the host path (TokenSampler._sample_host): [n, columns] rows
            width = k * (2 if has_drop else 1) + has_tid + has_mask
            batch, position, expert, tid, drop, masked = _host_columns(
                ints[io: io + n * width].reshape(n, width), n, k, has_tid, has_drop, has_mask, *where)
            io += n * width
        else:
            batch, position, expert, tid, drop, masked, io = _device_columns(ints, io, n, k, has_tid, has_drop,
                                                                             has_mask)
        rows = np.empty((n * k, N_INT_COLS), dtype=np.int64)
        rows[:, 0], rows[:, 1], rows[:, 2] = step, layer, mode
        rows[:, 3], rows[:, 4] = np.repeat(batch, k), np.repeat(position, k)
        rows[:, 5] = np.tile(np.arange(k), n)
        rows[:, 6] = expert
        rows[:, 7] = -1 if tid is None else np.repeat(tid, k)
        rows[:, 8] = 0 if drop is None else drop
        rows[:, 9] = 0 if masked is None else np.repeat(masked, k)
        out.append(rows)
        if w is None:
            wout.append(np.full(n * k, np.nan, dtype=np.float32))
        else:
            wout.append(wts[wo: wo + n * k]); wo += n * k
    return np.concatenate(out), np.concatenate(wout)


def _thin(e: list, q: int, m: int) -> list:
    """Entry ``e`` of ``n`` sampled tokens with every ``q``-th token kept, ``m`` of them."""
    _, layer, mode, n, k, has_tid, has_drop, has_mask, ints, w, where = e
    keep = slice(0, q * m, q)
    if w is not None:
        w = w.reshape(n, -1)[keep].reshape(-1) if where is None else w[keep]
    if where is not None:   # host path: [n, width] rows, positions from (offset, stride)
        off, stride, seq, positions = where
        return [e[0], layer, mode, m, k, has_tid, has_drop, has_mask, ints[keep], w, (off, q * stride, seq, positions)]
    parts, at = [], 0
    for c in _device_widths(k, has_tid, has_drop, has_mask):
        parts.append(ints[at: at + n * c].reshape(n, c)[keep].reshape(-1))
        at += n * c
    return [e[0], layer, mode, m, k, has_tid, has_drop, has_mask, torch.cat(parts), w, None]


def _host_columns(a: np.ndarray, n: int, k: int, has_tid, has_drop, has_mask, off, stride, seq, positions):
    """Columns of a host-path entry: ``a`` ``[n, width]`` int64 as ``_sample_host`` wrote it."""
    pos = off + stride * np.arange(n, dtype=np.int64)
    if seq is None:
        batch, position = np.zeros(n, np.int64), pos
    else:
        batch, col = np.divmod(pos, seq)
        position = col if positions is None else positions[col].astype(np.int64)
    c = k
    tid = a[:, c] if has_tid else None
    c += has_tid
    drop = a[:, c: c + k].reshape(-1) if has_drop else None
    c += k if has_drop else 0
    masked = a[:, c] if has_mask else None
    return batch, position, a[:, :k].reshape(-1), tid, drop, masked


def _device_widths(k: int, has_tid, has_drop, has_mask) -> list:
    """Per sampled token, the widths of a device-path entry's int sections, in the order
    ``TokenSampler.sample`` concatenates them: batch, position, experts (k), token id, dropped
    (k), padding (the last three when present)."""
    return [1, 1, k] + [1] * has_tid + [k] * has_drop + [1] * has_mask


def _device_columns(ints: np.ndarray, io: int, n: int, k: int, has_tid, has_drop, has_mask):
    """Columns of a device-path entry (``TokenSampler.sample``'s tensor ops) at ``ints[io:]``,
    and the offset after it."""
    sections = []
    for c in _device_widths(k, has_tid, has_drop, has_mask):
        sections.append(ints[io: io + n * c])
        io += n * c
    batch, position, expert, *rest = sections
    tid = rest.pop(0) if has_tid else None
    drop = rest.pop(0) if has_drop else None
    masked = rest.pop(0) if has_mask else None
    return batch, position, expert, tid, drop, masked, io
