"""newcomer2: a RouterSpec router whose top-k cannot be read is not silently recorded as top-1."""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

import chrono
import probes
from probes.discovery import find_sites


class Router(nn.Module):
    """A custom router with no top_k / num_experts_per_tok attribute: k is a forward argument."""

    def __init__(self, n=6):
        super().__init__()
        self.proj = nn.Linear(8, n, bias=False)

    def forward(self, x, k=2):
        logits = self.proj(x)
        w, idx = torch.topk(logits.softmax(-1), k, dim=-1)
        return logits, w, idx


class Model(nn.Module):
    def __init__(self, layers=2, config=None):
        super().__init__()
        self.routers = nn.ModuleList(Router() for _ in range(layers))
        if config is not None:
            self.config = config

    def forward(self, x):
        return [r(x)[2] for r in self.routers]


def _parse(module, args, out):
    return {"logits": out[0], "weights": out[1], "indices": out[2]}


def test_top_k_comes_from_the_model_config_when_the_router_has_none():
    model = Model(config=types.SimpleNamespace(num_experts_per_tok=2))
    sites = find_sites(model, specs=[probes.RouterSpec("routers.*", parse=_parse, n_experts=6)])
    assert [s.top_k for s in sites] == [2, 2]      # was 1: the attribute default


def test_unreadable_top_k_is_said_once_and_the_spec_value_wins(caplog, tmp_path):
    model = Model(layers=3)
    with caplog.at_level(logging.WARNING, logger="probes"):
        sites = find_sites(model, specs=[probes.RouterSpec("routers.*", parse=_parse, n_experts=6)])
    said = [r.getMessage() for r in caplog.records if "top-k" in r.getMessage()]
    assert len(said) == 1 and "routers.0" in said[0] and "3 routers" in said[0]
    assert "RouterSpec(..., top_k=K)" in said[0]
    assert [s.top_k for s in sites] == [1, 1, 1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="probes"):
        sites = find_sites(model, specs=[probes.RouterSpec("routers.*", parse=_parse, n_experts=6, top_k=2)])
    assert [s.top_k for s in sites] == [2, 2, 2] and not caplog.records
    with probes.attach(model, run="spec", root=tmp_path,
                       specs=[probes.RouterSpec("routers.*", parse=_parse, n_experts=6, top_k=2)]) as h:
        model(torch.randn(4, 8))
        h.step()
    ((top_k,),) = chrono.connect(tmp_path).execute("SELECT top_k FROM runs WHERE run_id = 'spec'").fetchall()
    assert top_k == 2
