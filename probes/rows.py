"""Turning one closed window of host arrays into store records (NumPy only, no torch).

``routing_blocks`` -> ``RoutingBlock`` per (mode, expert count); ``padding_signals`` and
``fault_signals`` -> ``Signal``; ``write_token_rows`` -> ``log_tokens`` calls. Padding and
dropped assignments never become routing facts of an expert. Record types: ``probes.records``.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .records import RoutingBlock, Signal, TokenRows, WindowArrays
from .recorder import MODES


def routing_blocks(steps: np.ndarray, layer_ids: np.ndarray, experts: list[int], arrays: WindowArrays,
                   expert_offsets=None) -> list[RoutingBlock]:
    """The routing rows of the steps with traffic, one block per mode and per expert count.

    ``steps``: ``[n]`` int64 step numbers of ``arrays``' rows; ``layer_ids``: ``[slot]`` int32;
    ``experts``: expert count per slot; ``expert_offsets(slots) -> [len(slots)]`` int64 for
    expert-parallel global ids (None: local ids).
    """
    counts, weight, dropped = arrays.counts, arrays.weight, arrays.dropped
    blocks = []
    traffic = counts.sum(axis=(2, 3)) + dropped.sum(axis=(2, 3))  # [n, mode]
    for m, mode in enumerate(MODES):
        active = np.flatnonzero(traffic[:, m] > 0)
        if not len(active):
            continue
        for e in sorted(set(experts)):
            grp = [i for i, x in enumerate(experts) if x == e]
            sel = np.ix_(active, [m], grp)
            blocks.append(RoutingBlock(
                step=steps[active][:, None], layer=layer_ids[grp][None, :],
                counts=counts[sel][:, 0, :, :e], weight_sum=weight[sel][:, 0, :, :e],
                dropped=dropped[sel][:, 0, :, :e], mode=mode,
                expert_offset=None if expert_offsets is None else expert_offsets(grp)[None, :]))
    return blocks


def padding_signals(steps: np.ndarray, layer_ids: np.ndarray, padding: np.ndarray) -> list[Signal]:
    """``probes.padding_excluded`` (assignments) for every step and layer with padding.

    ``padding``: ``[n_steps, mode, slot]`` assignments of padding tokens that were not counted.
    """
    per = padding.sum(axis=1)   # [n, slot]
    return [Signal(int(steps[i]), "probes.padding_excluded", float(per[i, j]), int(layer_ids[j]))
            for i, j in zip(*np.nonzero(per))]


def invalid_indices(arrays: WindowArrays, experts: list[int]) -> np.ndarray:
    """``[slot]`` int64 assignments to an index outside ``[0, n_experts)`` of each slot."""
    counts, dropped = arrays.counts, arrays.dropped
    return arrays.invalid.sum(axis=(0, 1)) + np.array(
        [counts[:, :, i, n:].sum() + dropped[:, :, i, n:].sum() for i, n in enumerate(experts)],
        dtype=np.int64)


def write_token_rows(w, tokens: TokenRows) -> None:
    """Write sampled token rows, one ``log_tokens`` call per mode.

    Dropped assignments and padding tokens are not written; an unknown token id is NULL.
    """
    ints, weights = tokens
    keep = (ints[:, 8] == 0) & (ints[:, 9] == 0)
    ints, weights = ints[keep], weights[keep]
    for m, mode in enumerate(MODES):
        sel = ints[:, 2] == m
        if not sel.any():
            continue
        x, wt = ints[sel], weights[sel]
        tid = x[:, 7]
        unknown = tid < 0
        token_id = None if unknown.all() else (tid if not unknown.any() else pa.array(tid, mask=unknown))
        w.log_tokens(step=x[:, 0], layer=x[:, 1], expert=x[:, 6],
                     weight=None if np.isnan(wt).all() else wt,
                     batch_idx=x[:, 3], position=x[:, 4], k=x[:, 5],
                     token_id=token_id, mode=mode)
