"""Helpers shared by the reference workloads: the digits data that ships with scikit-learn,
instrumentation through ``probes.attach`` (the models' routers follow the native router
protocol, so no adapter code is needed), seeding and the printed summary. The text corpus and
its byte batches live in ``reference_models.corpus``."""
from __future__ import annotations

import numpy as np
import torch


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
