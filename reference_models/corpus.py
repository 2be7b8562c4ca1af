"""The one text corpus of every reference workload, example and benchmark, and its batches.

Corpus: Python's own help topics (stdlib ``pydoc_data.topics``), the topics in sorted key
order joined by one newline, UTF-8 encoded: 466,195 bytes with CPython 3.11.7
(sha256 ``2a95af4a…``; the exact bytes depend on the Python version that ships the topics).
These are the bytes the governance benchmark's cached runs were trained on
(``benchmarks/results/governance_cache/``), so they must not change.

Split: the first ``1 - val_fraction`` (default 90 %) for training, the rest for validation,
fixed, no shuffle. Batches: ``byte_batches`` draws random windows with a NumPy generator of
its own (``seed``); the governance benchmark and Astarte draw windows their own way from the
same bytes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SEPARATOR = "\n"        # between two topics
VAL_FRACTION = 0.1


@lru_cache(maxsize=1)
def pydoc_bytes() -> bytes:
    """The corpus as ``bytes`` (see the module docstring); computed once per process."""
    from pydoc_data.topics import topics

    return SEPARATOR.join(topics[k] for k in sorted(topics)).encode("utf-8")


def text_bytes() -> np.ndarray:
    """The corpus as a read-only ``uint8`` array ``[n_bytes]`` (a view of ``pydoc_bytes()``)."""
    return np.frombuffer(pydoc_bytes(), dtype=np.uint8)


def split_bytes(data, val_fraction: float = VAL_FRACTION):
    """``(train, val)``: the first ``int(len · (1 − val_fraction))`` items, then the rest.

    Works on anything sliceable with a length (``np.ndarray``, ``torch.Tensor``, ``bytes``).
    """
    cut = int(len(data) * (1.0 - val_fraction))
    return data[:cut], data[cut:]


def byte_batches(data: np.ndarray, block: int, batch: int, seed: int, steps: int):
    """Yield ``steps`` random ``(inputs [B, T], targets [B, T])`` int64 batches of ``data``
    (``B = batch``, ``T = block``; targets are inputs shifted by one byte). Window starts come
    from ``np.random.default_rng(seed)``, so the batches depend only on the arguments."""
    g = np.random.default_rng(seed)
    d = torch.from_numpy(data.astype(np.int64))
    for _ in range(steps):
        ix = g.integers(0, len(data) - block - 1, size=batch)
        x = torch.stack([d[i:i + block] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + block] for i in ix])
        yield x, y


def fixed_val_batches(data: np.ndarray, block: int, batch: int, n_batches: int, seed: int = 1234):
    """A fixed list of validation batches (the same every call for a given seed)."""
    return list(byte_batches(data, block, batch, seed, n_batches))
