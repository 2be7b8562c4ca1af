"""Tiny native-protocol router models and a fake probes Handle for governance tests."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chrono.snapshots import AlertTracker, layer_rows


class TinyRouter(nn.Module):
    """Native chrono router (logits, weights, indices) with selection_bias and temperature."""

    chrono_router = True

    def __init__(self, d=16, n_experts=4, top_k=1, layer_id=0, skew=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_experts, self.top_k, self.layer_id = n_experts, top_k, layer_id
        self.weight = nn.Parameter(torch.randn(n_experts, d, generator=g))
        self.register_buffer("selection_bias", torch.zeros(n_experts))
        self.temperature = 1.0
        with torch.no_grad():   # expert 0 favoured by `skew` along a shared direction
            self.weight[0] += skew

    def forward(self, x):
        logits = x @ self.weight.t()
        probs = torch.softmax(logits / self.temperature, -1)
        idx = torch.topk(logits + self.selection_bias, self.top_k, -1).indices
        return logits, probs.gather(-1, idx), idx


class TinyModel(nn.Module):
    def __init__(self, n_layers=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"router": TinyRouter(layer_id=i, seed=i, **kw)})
                                    for i in range(n_layers))

    def forward(self, x):
        return [layer["router"](x)[2] for layer in self.layers]


class FakeHandle:
    """The probes Handle surface govern() uses: routers, on_snapshot, record_decisions, writer, run_id.

    ``step()`` counts the routers' indices itself and, every ``flush_every``
    steps, builds snapshot rows and calls the callbacks like probes does.
    """

    def __init__(self, model, writer=None, run_id="run", flush_every=5):
        self.model, self.writer, self.run_id, self.flush_every = model, writer, run_id, flush_every
        self.routers = [{"name": f"layers.{i}.router", "layer": i, "n_experts": l["router"].n_experts,
                         "top_k": l["router"].top_k, "adapter": "native"}
                        for i, l in enumerate(model.layers)]
        self.callbacks, self.decisions, self.snapshots, self.transitions = [], [], [], []
        self.tracker = AlertTracker()
        self._step = 0
        self._counts = {s["layer"]: np.zeros(s["n_experts"], np.int64) for s in self.routers}

    def on_snapshot(self, fn):
        self.callbacks.append(fn)

    def record_decisions(self, rows):
        self.decisions.extend(rows)
        if self.writer is not None:
            self.writer.log_rows("decisions", rows)

    def observe(self, indices_per_layer):
        for layer, idx in enumerate(indices_per_layer):
            self._counts[layer] += np.bincount(idx.reshape(-1).numpy(), minlength=len(self._counts[layer]))

    def step(self):
        self._step += 1
        if self._step % self.flush_every == 0:
            end = self._step - 1
            rows = layer_rows(self.run_id, end + 1 - self.flush_every, end, self._counts)
            self.transitions.extend(self.tracker.update(rows))
            self.snapshots.append(rows)
            if self.writer is not None:
                self.writer.log_rows("snapshots", rows)
            for fn in self.callbacks:
                fn(end, rows, self)
            self._counts = {k: np.zeros_like(v) for k, v in self._counts.items()}


@pytest.fixture
def tiny_model():
    return TinyModel


@pytest.fixture
def fake_handle():
    return FakeHandle
