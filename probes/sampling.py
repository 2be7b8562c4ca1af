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
"""
from __future__ import annotations

import math

import numpy as np
import torch

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
        self._rand = torch.empty(OFFSET_SLOTS, dtype=torch.int64, device=device)
        self._redraw()

    def _redraw(self) -> None:
        # one device op per step: new random words for the next step's calls (no host sync)
        self._rand.random_(0, 2 ** 62, generator=self._gen)

    def sample(self, layer: int, mode: int, indices, weights=None, dropped=None, ctx=None) -> None:
        """Sample this router call's tokens. ``ctx``: the ``probes.context.ForwardContext`` of the
        call when it describes these tokens (``T == B*S``), else None (flat positions, no ids)."""
        idx = indices.detach().reshape(indices.shape[0], -1)
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
        self._pending.append([None, layer, mode, n, k, has_tid, dropped is not None, has_mask, ints, w])
        self.sampled += n

    def restep(self, from_step: int) -> None:
        """Finished steps >= ``from_step`` become part of the open step again (step merge)."""
        back = [e for e in self._ready if e[0] >= from_step]
        if back:
            self._ready = [e for e in self._ready if e[0] < from_step]
            self._pending = back + self._pending

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
    ints = torch.cat([e[8] for e in ready]).to("cpu", copy=True).numpy()
    ws = [e[9] for e in ready if e[9] is not None]
    wts = torch.cat(ws).to("cpu", copy=True).numpy() if ws else np.zeros(0, np.float32)
    out, wout, io, wo = [], [], 0, 0
    for step, layer, mode, n, k, has_tid, has_drop, has_mask, _, w in ready:
        batch = ints[io: io + n]; io += n
        position = ints[io: io + n]; io += n
        expert = ints[io: io + n * k]; io += n * k
        tid = None
        if has_tid:
            tid = ints[io: io + n]; io += n
        drop = None
        if has_drop:
            drop = ints[io: io + n * k]; io += n * k
        masked = None
        if has_mask:
            masked = ints[io: io + n]; io += n
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
