"""The handle's counts as ``chrono.router_loads.RouterLoads``: what actuators read, no hook of theirs.

A cursor's ``take()`` returns the assignments (counted tokens + capacity-dropped ones,
summed over modes) its router made since the previous take, float32 ``[n_experts]`` on
the recorder's device. It reads the recorder's buffers on the device, no host sync:

    total = closed windows + the open window's sum (``Recorder.win``) + the open step

``Window.close`` calls ``window_closing()`` before the recorder's window sum restarts, so
a window close (or a fold of provisional steps, which moves rows into the open step)
never changes ``total``; each term is O(layers x experts), whatever the window length. Nothing of this runs in the router hook; with no cursor
there is no cost at all. Callers of ``take`` need not hold the lock (an add racing a take
lands in the next take: nothing lost, nothing counted twice).
"""
from __future__ import annotations

import torch

from .recorder import DROPPED, TOKENS

_KINDS = [TOKENS, DROPPED]


class RecorderLoads:
    def __init__(self, window, lock):
        self._window, self._lock = window, lock
        self._closed: torch.Tensor | None = None   # [slot, capacity + 2] float64 of closed windows

    def _align(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``t`` on ``like``'s device and width (the recorder may grow or move)."""
        if t.device != like.device:
            t = t.to(like.device)
        if t.shape[-1] != like.shape[-1]:   # grown: keep experts, move the overflow column last
            wide = torch.zeros_like(like)
            wide[:, : t.shape[-1] - 1] = t[:, :-1]
            wide[:, -1] = t[:, -1]
            t = wide
        return t

    def window_closing(self) -> None:
        """The open window's sum is about to restart at 0: keep it."""
        part = self._window.rec.win[_KINDS].sum(dim=(0, 1))
        self._closed = part if self._closed is None else self._align(self._closed, part) + part

    def total(self, slot: int) -> torch.Tensor:
        """float64 ``[capacity + 2]`` assignments of ``slot`` since attach (recorder columns)."""
        with self._lock:
            rec = self._window.rec
            rec.flush()
            x = rec.acc[_KINDS, :, slot].sum(dim=(0, 1)) + rec.win[_KINDS, :, slot].sum(dim=(0, 1))
            if self._closed is not None:
                self._closed = self._align(self._closed, rec.acc[0, 0])
                x = x + self._closed[slot]
            return x

    def load_cursor(self, slot: int, n_experts: int) -> "RecorderCursor":
        return RecorderCursor(self, slot, n_experts)


class RecorderCursor:
    """``chrono.router_loads.LoadCursor`` over one recorder slot: experts ``[0, n_experts)``,
    counted from the cursor's creation."""

    def __init__(self, loads: RecorderLoads, slot: int, n_experts: int):
        self._loads, self._slot, self._n = loads, slot, int(n_experts)
        self._seen = loads.total(slot)

    def take(self) -> torch.Tensor:
        now = self._loads.total(self._slot)
        seen = self._seen
        if seen.device != now.device or seen.shape != now.shape:
            seen = self._loads._align(seen[None], now[None])[0]
        self._seen = now
        return (now - seen)[1: self._n + 1].to(torch.float32)
