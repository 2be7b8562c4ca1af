"""Lenses: modules applied to a router's input (a forward pre-hook) to steer routing.

``ChronoLens`` is ChronoMoE's low-rank warp, applied as its README specifies
(DESIGN §4): x' = x + s·(x @ V) @ U with rank 8 and U, V ~ N(0, 1)·1e-3. The
scale ``s`` is a buffer set by the controller; s = 0 returns ``x`` itself
(exact identity, no arithmetic). ChronoMoE's shipped code switched this path
off; we keep the formula, and DESIGN §6 / docs/governance.md record that it
barely moves routing (a 1e-3 random warp), which is why ``chrono.actuators``
exists.
"""
from __future__ import annotations

import torch
from torch import nn


class ChronoLens(nn.Module):
    """x' = x + s·(x @ V) @ U; trainable U [rank, d], V [d, rank]; scale buffer (0 = identity)."""

    def __init__(self, d_model: int, rank: int = 8, layer_id: int = 0, init_std: float = 1e-3,
                 seed: int | None = None):
        super().__init__()
        if d_model < 1 or rank < 1:
            raise ValueError("d_model and rank must be >= 1")
        self.d_model, self.rank, self.layer_id = int(d_model), int(rank), int(layer_id)
        gen = torch.Generator().manual_seed(seed if seed is not None else 1000 + self.layer_id)
        self.V = nn.Parameter(torch.randn(d_model, rank, generator=gen) * init_std)
        self.U = nn.Parameter(torch.randn(rank, d_model, generator=gen) * init_std)
        self.register_buffer("scale", torch.zeros(()))
        self._scale_value = 0.0  # host mirror of `scale`: no device sync in forward

    def set_scale(self, s: float) -> None:
        """Set s in place (no new tensor, so compiled graphs and hooks keep working)."""
        s = float(s)
        if s != s:
            raise ValueError("lens scale must not be NaN")
        self._scale_value = s
        self.scale.fill_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale_value == 0.0:
            return x
        warp = (x @ self.V.to(x.dtype)) @ self.U.to(x.dtype)
        return x + self.scale.to(x.dtype) * warp

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, rank={self.rank}, layer_id={self.layer_id}"


class IdentityLens(nn.Module):
    """A lens that never changes its input (the 'no control' arm); accepts set_scale."""

    def __init__(self, layer_id: int = 0):
        super().__init__()
        self.layer_id = int(layer_id)
        self.last_scale = 0.0

    def set_scale(self, s: float) -> None:
        self.last_scale = float(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
