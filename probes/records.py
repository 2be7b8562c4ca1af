"""The typed records one routing count travels in, from the router hook to a Parquet part.

    router hook --Routed--> Recorder --> Window --WindowJob--> Sink: WindowArrays -> ClosedWindow --> RunWriter
                  (routing.py)   (device buffers)  (training thread) | (background thread)          (Parquet)

* ``probes.routing.Routed``: one router call, as the adapter parsed it (device tensors).
* ``WindowArrays``: the steps of one window copied to the host once (``Recorder.take``).
* ``RoutingBlock`` / ``Signal`` / ``TokenRows``: what ``probes.rows`` derives from them, one
  record per ``RunWriter.log_routing`` / ``log_signal`` / ``log_tokens`` call.
* ``WindowSnapshot``: the snapshot stage's result for a window (rows, alert transitions).
* ``WindowJob``: what a window close hands from the training thread to the background
  writer (O(1) in the window's length: a device buffer, the small window sums).
* ``ClosedWindow``: the rows the background writer derives from a ``WindowJob`` and writes.

All are immutable (NamedTuple or frozen dataclass); arrays inside are owned by the
record (copies of the device buffers, never views of memory that is reused).
Mode indices follow ``chrono.schema.MODES`` (``probes.recorder.TRAIN/EVAL/INFER``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import numpy as np


class WindowArrays(NamedTuple):
    """Host copy of ``n`` steps of the recorder (``n_steps x modes x slots`` leading axes).

    ``counts``: ``[n, mode, slot, capacity]`` int64, tokens dispatched per expert (after
    capacity drops, padding excluded). ``dropped``: same shape, int64, assignments routed
    but not processed. ``weight``: same shape, float64, summed gate weight of the counted
    assignments (NaN/Inf when the router produced them). ``invalid``: ``[n, mode, slot]``
    int64, assignments to an index outside ``[0, capacity)``. ``nonfinite``: ``[n, mode,
    slot]`` int64, non-finite weight cells + 1 if the logit sum was non-finite.
    ``padding``: ``[n, mode, slot]`` int64, assignments of padding tokens (not counted).
    """

    counts: np.ndarray
    dropped: np.ndarray
    weight: np.ndarray
    invalid: np.ndarray
    nonfinite: np.ndarray
    padding: np.ndarray

    @property
    def n_steps(self) -> int:
        return int(self.counts.shape[0])

    def window_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, dropped)`` summed over steps and modes: ``[slot, capacity]`` int64 each."""
        return self.counts.sum(axis=(0, 1)), self.dropped.sum(axis=(0, 1))


class RoutingBlock(NamedTuple):
    """Arguments of one ``RunWriter.log_routing`` call: the routing rows of one mode and one
    expert count ``E`` (``n`` steps x ``L`` layers x ``E`` experts).

    ``step``: ``[n, 1]`` int64; ``layer``: ``[1, L]`` int32; ``counts`` / ``dropped``:
    ``[n, L, E]`` int64; ``weight_sum``: ``[n, L, E]`` float64; ``mode``: "TRAIN" / "EVAL" /
    "INFER"; ``expert_offset``: ``[1, L]`` int64 global id of each layer's expert 0
    (expert parallelism), None otherwise.
    """

    step: np.ndarray
    layer: np.ndarray
    counts: np.ndarray
    weight_sum: np.ndarray
    dropped: np.ndarray
    mode: str
    expert_offset: Optional[np.ndarray] = None

    @property
    def n_rows(self) -> int:
        return int(self.counts.size)

    def write(self, w) -> None:
        kw = {} if self.expert_offset is None else {"expert_offset": self.expert_offset}
        w.log_routing(step=self.step, layer=self.layer, counts=self.counts, mode=self.mode,
                      weight_sum=self.weight_sum, dropped=self.dropped, **kw)


class Signal(NamedTuple):
    """One ``signals`` row: ``step`` (int), dotted ``name``, ``value`` (float), ``layer`` (int or None)."""

    step: int
    name: str
    value: float
    layer: Optional[int] = None


class TokenRows(NamedTuple):
    """Sampled per-token rows of a window (``probes.sampling.TokenSampler.take``).

    ``ints``: ``[N, 10]`` int64 columns step, layer, mode, batch_idx, position, k, expert,
    token_id (-1 = unknown), dropped (0/1), padding (0/1); ``weights``: ``[N]`` float32
    (NaN when the router gave no weights).
    """

    ints: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class WindowSnapshot:
    """The snapshot stage's view of a closed window (``chrono.snapshots.layer_rows`` rows).

    ``rows``: SNAPSHOTS rows (dicts, one per layer and the global layer -1);
    ``transitions``: ALERTS rows raised / cleared by this window; ``counts``:
    ``{layer: [n_experts] int64}`` tokens per expert (summed over ranks when reduced).
    """

    first_step: int
    last_step: int
    rows: tuple
    transitions: tuple
    counts: dict


@dataclass(frozen=True)
class WindowJob:
    """One closed window as the training thread hands it to the background writer.

    ``steps``: ``[n]`` int64 step numbers; ``rows``: the recorder's device history rows
    ``[n, kind, mode, slot, capacity + 2]`` float64 (a buffer the recorder no longer
    writes until the job is done; None when ``n == 0``); ``experts``: expert count per
    slot; ``layer_ids``: ``[slot]`` int32; ``tokens``: ``TokenSampler.detach_ready()``
    entries or None; ``snapshot``: computed in the training thread (there were
    ``on_snapshot`` callbacks) or None; ``snapshot_input``: ``(first_step, last_step,
    counts, dropped)`` for ``SnapshotStage.observe`` on the background thread, or None;
    ``sizes`` / ``write_globals``: as in ``ClosedWindow``; ``expert_offsets`` and
    ``globalize_tokens``: the expert-parallel mappings (``probes.distributed``) or None.
    """

    steps: np.ndarray
    rows: Any
    experts: tuple
    layer_ids: np.ndarray
    tokens: Optional[list]
    snapshot: Optional["WindowSnapshot"]
    snapshot_input: Optional[tuple]
    sizes: dict
    write_globals: bool
    expert_offsets: Optional[Callable] = None
    globalize_tokens: Optional[Callable] = None


@dataclass(frozen=True)
class ClosedWindow:
    """Everything one window close hands to the sink, written on the background thread.

    ``sizes``: ``{layer: n_experts}`` declared before the rows (routers that grew or
    shrank); ``blocks``: routing rows; ``tokens``: sampled token rows or None;
    ``snapshot``: written only when ``write_globals`` (rank 0 of a multi-rank run, or a
    single process); ``signals``: padding / non-finite / invalid-index signals.
    """

    sizes: dict
    blocks: tuple
    tokens: Optional[TokenRows]
    snapshot: Optional[WindowSnapshot]
    signals: tuple
    write_globals: bool

    @property
    def n_rows(self) -> int:
        """Routing + token rows (what a dropped job loses)."""
        return sum(b.n_rows for b in self.blocks) + (0 if self.tokens is None else len(self.tokens.ints))
