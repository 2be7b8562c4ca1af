"""Helpers shared by the reference workloads: real data that ships with Python or
scikit-learn, byte tokenisation, and instrumentation of a model's routers.

``instrument`` uses ``probes.attach`` when the probes package provides it. Until then
(or when probes is unavailable) it falls back to ``RouterTap``: forward hooks on every
module that follows the native router protocol (``chrono_router = True``), counting the
returned indices per layer, writing routing rows, snapshots and alert transitions to the
store every ``flush_every`` steps, and calling ``on_snapshot`` callbacks like the probes
Handle does.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

import chrono
from chrono.snapshots import AlertTracker, layer_rows


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
def find_routers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if getattr(m, "chrono_router", False)]


class RouterTap:
    """Minimal stand-in for a probes Handle over native-protocol routers (see module doc)."""

    def __init__(self, model, run: str, root, flush_every: int = 50, model_info: dict | None = None,
                 config: dict | None = None):
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError("model has no module with chrono_router = True")
        self.run_id = run
        self.flush_every = flush_every
        self._layer_of = {id(m): int(getattr(m, "layer_id", i)) for i, (_, m) in enumerate(self.routers)}
        info = dict(model_info or {})
        info.setdefault("layers", sorted(self._layer_of.values()))
        info.setdefault("experts_per_layer", {str(self._layer_of[id(m)]): int(m.n_experts)
                                              for _, m in self.routers})
        info.setdefault("top_k", int(self.routers[0][1].top_k))
        info.setdefault("adapter", "native")
        self.writer = chrono.open_run(root, run, model=info, config=config)
        self._step = 0
        self._window_start = 0
        self._counts: dict[int, np.ndarray] = {}
        self._step_counts: dict[int, np.ndarray] = {}
        self._callbacks: list[Callable] = []
        self._tracker = AlertTracker()
        self._latest: list[dict] = []
        self._hooks = [m.register_forward_hook(self._hook) for _, m in self.routers]
        self.mode = "TRAIN"

    # forward hook: count returned indices of this layer
    def _hook(self, module, args, output):
        idx = output[2]
        layer = self._layer_of[id(module)]
        n = int(module.n_experts)
        c = torch.bincount(idx.reshape(-1).detach().to("cpu"), minlength=n).numpy()[:n]
        if len(output) > 3 and output[3] is not None:  # dropped mask
            keep = ~output[3].reshape(-1).to("cpu")
            c = torch.bincount(idx.reshape(-1).detach().to("cpu")[keep], minlength=n).numpy()[:n]
        if self.mode != "TRAIN":
            return None
        prev = self._step_counts.get(layer)
        self._step_counts[layer] = c if prev is None or len(prev) != n else prev + c
        return None

    def on_snapshot(self, fn: Callable) -> None:
        self._callbacks.append(fn)

    def window_counts(self) -> dict[int, np.ndarray]:
        return {k: v.copy() for k, v in self._counts.items()}

    def step(self) -> None:
        for layer, c in self._step_counts.items():
            self.writer.log_routing(self._step, layer, c[None, :], mode="TRAIN")
            prev = self._counts.get(layer)
            if prev is None or len(prev) != len(c):  # expert set changed: new window content
                self._counts[layer] = c.astype(np.int64)
            else:
                self._counts[layer] = prev + c
        self._step_counts = {}
        self._step += 1
        if self._step % self.flush_every == 0:
            self._snapshot()

    def _snapshot(self) -> None:
        end = self._step - 1
        rows = layer_rows(self.run_id, self._window_start, end, self._counts) if self._counts else []
        if rows:
            self.writer.log_rows("snapshots", rows)
            self.writer.log_rows("alerts", self._tracker.update(rows))
            self._latest = rows
            for fn in self._callbacks:
                fn(end, rows, self)
        self._counts = {}
        self._window_start = self._step
        self.writer.flush()

    def latest_snapshot(self) -> list[dict]:
        return list(self._latest)

    def flush(self) -> None:
        self.writer.flush()

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


class _WindowCounts:
    """Per-expert counts of the current window for a probes Handle (lifecycle needs them)."""

    def __init__(self, model):
        self.routers = find_routers(model)
        self._layer_of = {id(m): int(getattr(m, "layer_id", i)) for i, (_, m) in enumerate(self.routers)}
        self.counts: dict[int, np.ndarray] = {}
        self.training = True
        self._hooks = [m.register_forward_hook(self._hook) for _, m in self.routers]

    def _hook(self, module, args, output):
        if not module.training:
            return None
        layer, n = self._layer_of[id(module)], int(module.n_experts)
        c = torch.bincount(output[2].reshape(-1).detach().to("cpu"), minlength=n).numpy()[:n]
        prev = self.counts.get(layer)
        self.counts[layer] = c if prev is None or len(prev) != n else prev + c
        return None

    def take(self) -> dict[int, np.ndarray]:
        out, self.counts = self.counts, {}
        return out

    def remove(self):
        for h in self._hooks:
            h.remove()


def instrument(model, run: str, root, flush_every: int = 50, model_info: dict | None = None,
               config: dict | None = None):
    """probes.attach(model, ...) when available, else a RouterTap (same surface we use)."""
    try:
        import probes

        attach = getattr(probes, "attach", None)
    except ImportError:
        attach = None
    if attach is None:
        return RouterTap(model, run, root, flush_every, model_info, config)
    return attach(model, run=run, root=root, flush_every=flush_every)


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
