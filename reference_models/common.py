"""Helpers shared by the reference workloads: real data that ships with Python or
scikit-learn, byte tokenisation, and instrumentation through ``probes.attach`` (the models'
routers follow the native router protocol, so no adapter code is needed)."""
from __future__ import annotations

import numpy as np
import torch


# ------------------------------------------------------------------ text data
def text_bytes() -> np.ndarray:
    """Python's own documentation topics (pydoc_data.topics) as a uint8 array (~1 MB)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def split_bytes(data: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) for training, the rest for validation (fixed, no shuffle)."""
    cut = int(len(data) * (1.0 - val_fraction))
    return data[:cut], data[cut:]


def byte_batches(data: np.ndarray, block: int, batch: int, seed: int, steps: int):
    """Yield ``steps`` random (inputs [B, T], targets [B, T]) int64 batches of ``data``."""
    g = np.random.default_rng(seed)
    d = torch.from_numpy(data.astype(np.int64))
    for _ in range(steps):
        ix = g.integers(0, len(data) - block - 1, size=batch)
        x = torch.stack([d[i:i + block] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + block] for i in ix])
        yield x, y


def fixed_val_batches(data: np.ndarray, block: int, batch: int, n_batches: int, seed: int = 1234):
    """A fixed list of validation batches (same every call for a given seed)."""
    return list(byte_batches(data, block, batch, seed, n_batches))


# ------------------------------------------------------------------ digits data
def digits_split(test_size: float = 0.25, seed: int = 0):
    """sklearn's load_digits (1797 8x8 images), stratified fixed split, scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_size, random_state=seed,
                                          stratify=d.target)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.int64)),
            torch.from_numpy(xte), torch.from_numpy(yte.astype(np.int64)))


# ------------------------------------------------------------------ instrumentation
def instrument(model, run: str, root, flush_every: int = 50, model_info: dict | None = None,
               config: dict | None = None):
    """``probes.attach`` with the workload's description and config in the manifest."""
    import probes

    cfg = dict(config or {})
    if model_info:
        cfg["workload"] = model_info
    # a workload trains from step 0: an existing run with steps is refused (chrono.store.ledger), never appended to
    return probes.attach(model, run=run, root=root, flush_every=flush_every, config=cfg, start_step=0)


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class WorkloadSummary(dict):
    """A run's summary (a dict) that ``chrono workload`` prints with ``.summary()``:
    one aligned line per key of ``KEYS`` present, in that order."""

    KEYS: tuple[str, ...] = ()

    def summary(self) -> str:
        def fmt(v):
            return f"{v:.4f}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)
        return "\n".join(f"{k:>20}: {fmt(self[k])}" for k in self.KEYS if k in self)
