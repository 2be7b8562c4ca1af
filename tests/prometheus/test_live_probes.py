"""The exporter on a real ``probes.attach`` handle (native router protocol, tiny model, CPU)."""
from __future__ import annotations

import urllib.request

import pytest

torch = pytest.importorskip("torch")
probes = pytest.importorskip("probes")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


class Router(torch.nn.Module):
    chrono_router = True

    def __init__(self, d, n_experts, top_k, layer_id):
        super().__init__()
        self.n_experts, self.top_k, self.layer_id = n_experts, top_k, layer_id
        self.proj = torch.nn.Linear(d, n_experts)

    def forward(self, x):
        logits = self.proj(x)                                 # [T, E]
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)  # [T, k]
        return logits, w, idx


class TinyMoE(torch.nn.Module):
    def __init__(self, d=8, n_experts=4, n_layers=2):
        super().__init__()
        self.routers = torch.nn.ModuleList(Router(d, n_experts, 2, l) for l in range(n_layers))
        with torch.no_grad():  # layer 1 strongly prefers expert 0 (collapse-prone)
            self.routers[1].proj.bias.copy_(torch.tensor([6.0, 5.0, -6.0, -6.0]))

    def forward(self, x):
        for r in self.routers:
            r(x)
        return x


def test_real_handle_served_metrics_equal_its_snapshot(store_root):
    torch.manual_seed(0)
    model = TinyMoE()
    with probes.attach(model, run="live", root=store_root, flush_every=5) as h:
        for _ in range(20):
            model(torch.randn(64, 8))
            h.step()
        h.flush()  # close the open window so every step is in the counters
        server = h.serve_metrics(0)
        try:
            with urllib.request.urlopen(server.url, timeout=10) as r:
                fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        finally:
            server.close()
        rows = {r["layer"]: r for r in h.latest_snapshot() if r["layer"] >= 0}
        stats = h.stats()
    assert set(rows) == {0, 1}
    for name, col in [("chrono_neff", "neff"), ("chrono_top2_share", "top2_share"),
                      ("chrono_dead_experts", "dead")]:
        got = {int(s.labels["layer"]): s.value for s in fams[name].samples}
        assert got == {l: float(r[col]) for l, r in rows.items()}, name
        assert {s.labels["run"] for s in fams[name].samples} == {"live"}
    tokens = {int(s.labels["layer"]): s.value for s in fams["chrono_tokens_routed"].samples}
    assert tokens == {l: float(n) for l, n in stats["tokens_total"].items()}
    assert tokens == {0: 20 * 64 * 2.0, 1: 20 * 64 * 2.0}  # every (token, k) assignment counted
    hook = [s.value for s in fams["chrono_probe_hook_seconds"].samples]
    assert len(hook) == 1 and hook[0] > 0
    assert rows[1]["dead"] >= 1  # the biased layer starved experts 2 and 3


def test_metrics_port_serves_until_detach_and_a_taken_port_leaves_no_hooks(store_root):
    """``attach(metrics_port=...)``: the endpoint lives as long as the handle; a port that
    cannot be bound is a clear error that leaves the model unhooked and the run closed."""
    import socket

    from chrono.exporters.prometheus import ExporterError

    model = TinyMoE()
    with probes.attach(model, run="port", root=store_root, flush_every=2, metrics_port=0) as h:
        url = h.metrics_server.url
        for _ in range(4):
            model(torch.randn(16, 8))
            h.step()
        with urllib.request.urlopen(url, timeout=10) as r:
            assert 'chrono_neff{layer="1",run="port"}' in r.read().decode()
    with pytest.raises(OSError):                      # detach closed it: the port is free again
        urllib.request.urlopen(url, timeout=5)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(ExporterError, match="address already in use"):
            probes.attach(model, run="port2", root=store_root, metrics_port=taken.getsockname()[1])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with probes.attach(model, run="port2", root=store_root):   # the writer lock was released
        pass
