"""Turning one closed window of host arrays into store rows (runs in the training thread, NumPy only).

``routing_jobs`` -> ``RunWriter.log_routing`` keyword sets, one per (mode,
expert count); ``token_rows`` -> ``log_tokens`` calls. Padding and dropped
assignments never become routing facts of an expert.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .recorder import MODES


def routing_jobs(steps: np.ndarray, layer_ids: np.ndarray, experts: list[int], counts, weight, dropped,
                 expert_offsets=None) -> list[dict]:
    """``log_routing`` kwargs for the steps with traffic, per mode and per expert count.

    ``counts / weight / dropped``: ``[n_steps, mode, slot, capacity]``; ``experts``: expert count
    per slot; ``expert_offsets(slots) -> [len(slots)]`` for expert-parallel global ids.
    """
    jobs = []
    traffic = counts.sum(axis=(2, 3)) + dropped.sum(axis=(2, 3))  # [n, mode]
    for m, mode in enumerate(MODES):
        active = np.flatnonzero(traffic[:, m] > 0)
        if not len(active):
            continue
        for e in sorted(set(experts)):
            grp = [i for i, x in enumerate(experts) if x == e]
            sel = np.ix_(active, [m], grp)
            job = dict(step=steps[active][:, None], layer=layer_ids[grp][None, :],
                       counts=counts[sel][:, 0, :, :e], mode=mode,
                       weight_sum=weight[sel][:, 0, :, :e], dropped=dropped[sel][:, 0, :, :e])
            if expert_offsets is not None:
                job["expert_offset"] = expert_offsets(grp)[None, :]
            jobs.append(job)
    return jobs


def padding_signals(steps: np.ndarray, layer_ids: np.ndarray, padding: np.ndarray) -> list[tuple]:
    """``(step, "probes.padding_excluded", assignments, layer)`` for every step and layer with padding.

    ``padding``: ``[n_steps, mode, slot]`` assignments of padding tokens that were not counted.
    """
    per = padding.sum(axis=1)   # [n, slot]
    out = []
    for i, j in zip(*np.nonzero(per)):
        out.append((int(steps[i]), "probes.padding_excluded", float(per[i, j]), int(layer_ids[j])))
    return out


def log_token_rows(w, ints: np.ndarray, weights: np.ndarray) -> None:
    """Write sampled token rows (see ``TokenSampler.take``), one ``log_tokens`` call per mode.

    Dropped assignments and padding tokens are not written; an unknown token id is NULL.
    """
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
