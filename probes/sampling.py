"""Per-token sampling into the ``tokens`` table, bounded per step.

For a router call over ``T`` tokens with rate ``p`` we take ``n = min(ceil(p*T),
budget)`` tokens by systematic sampling: positions ``off + i*stride`` with
``stride = T // n`` and a random offset drawn on the device (no host sync;
each token's inclusion probability is n / (n*stride), uniform over the first
n*stride tokens). The budget is ``max_tokens_per_step`` per layer per step,
counted on the host from shapes only. Sampled rows stay on the device until
the window is flushed, then are copied to the host in one concatenated copy.
Under ``torch.compile`` sampling runs outside the graph (a graph break per
router call when tokens > 0); aggregate counting stays inside it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

N_INT_COLS = 9  # step, layer, mode, batch_idx, position, k, expert, token_id(-1 = none), dropped


class TokenSampler:
    def __init__(self, rate: float, max_tokens_per_step: int, seed: int = 0):
        if not (0.0 < rate <= 1.0):
            raise ValueError("tokens must be 0 (off) or a fraction in (0, 1]")
        if max_tokens_per_step < 1:
            raise ValueError("max_tokens_per_step must be >= 1")
        self.rate = float(rate)
        self.max_tokens_per_step = int(max_tokens_per_step)
        self.seed = int(seed)
        self._gens: dict = {}
        self._used: dict[int, int] = {}
        self._pending: list = []
        self._ready: list = []
        self.sampled = 0

    def _gen(self, device) -> torch.Generator:
        g = self._gens.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._gens[device] = g
        return g

    @torch._dynamo.disable
    def sample(self, layer: int, mode: int, indices, weights=None, dropped=None, token_ids=None,
               seq_len: int | None = None) -> None:
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
        off = torch.randint(0, stride, (1,), device=dev, generator=self._gen(dev))
        pos = off + torch.arange(n, device=dev) * stride                       # [n]
        ints = torch.empty((n, k, N_INT_COLS), dtype=torch.int64, device=dev)
        ints[..., 0] = -1  # step, filled in when the step ends
        ints[..., 1] = layer
        ints[..., 2] = mode
        if seq_len and T % seq_len == 0:
            ints[..., 3] = (pos // seq_len)[:, None]
            ints[..., 4] = (pos % seq_len)[:, None]
        else:
            ints[..., 3] = 0
            ints[..., 4] = pos[:, None]
        ints[..., 5] = torch.arange(k, device=dev)[None, :]
        ints[..., 6] = idx[pos]
        if token_ids is not None and token_ids.numel() == T:
            ints[..., 7] = token_ids.reshape(-1).to(dev)[pos][:, None]
        else:
            ints[..., 7] = -1
        if dropped is not None:
            ints[..., 8] = dropped.detach().reshape(T, -1)[pos].to(torch.int64)
        else:
            ints[..., 8] = 0
        if weights is not None:
            w = weights.detach().reshape(T, -1)[pos].float()
        else:
            w = torch.full((n, k), float("nan"), device=dev)
        self._pending.append((ints.reshape(-1, N_INT_COLS), w.reshape(-1)))
        self.sampled += n

    def end_step(self, step: int) -> None:
        for ints, _ in self._pending:
            ints[:, 0] = step
        self._ready.extend(self._pending)
        self._pending = []
        self._used = {}

    def take(self) -> tuple[np.ndarray, np.ndarray] | None:
        """All finished steps' rows as host arrays (one concatenated copy), or None."""
        if not self._ready:
            return None
        ints = torch.cat([r[0] for r in self._ready]).to("cpu", copy=True).numpy()
        w = torch.cat([r[1] for r in self._ready]).to("cpu", copy=True).numpy()
        self._ready = []
        return ints, w
