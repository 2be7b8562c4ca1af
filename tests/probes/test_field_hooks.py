"""Exact in the field (issue 15): hooks stack and unwind, one store root, the exporter contract."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import torch

import probe_models as T
import probes
from chrono.exporters.live import LiveRouting, missing_members
from field_truth import stored

torch.set_num_threads(1)


def _dbrx_truth(model, ids) -> dict:
    """Per layer expert counts: DbrxRouter's logits through the class's own route_tokens_to_experts."""
    ffns = [m for m in model.modules() if type(m).__name__ == "DbrxFFN"]
    logits = {}
    def keep(i):
        def h(mod, args, out):             # returns None: a returned value would replace the output
            logits.setdefault(i, out.detach())
        return h

    hs = [f.router.register_forward_hook(keep(i)) for i, f in enumerate(ffns)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hs:
        h.remove()
    out = {}
    for i, f in enumerate(ffns):
        _, idx = type(f).route_tokens_to_experts(f, logits[i])
        out[i] = np.bincount(idx.reshape(-1).numpy(), minlength=6)
    return out


def _model_state(model):
    """Everything attaching may touch: hook dicts of every module and instance attributes."""
    out = []
    for name, m in model.named_modules():
        out.append((name, tuple(sorted(k for k in m.__dict__ if not k.startswith("_") or k in (
            "_forward_hooks", "_forward_pre_hooks")))))
        for d in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            out.append((name, d, tuple(getattr(m, d, {}).keys())))
        out.append((name, "route", m.__dict__.get("route_tokens_to_experts")))
    return out


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_two_handles_on_a_method_wrapping_adapter(store_root, order):
    m = T.dbrx().eval()
    ids = torch.randint(1, T.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    truth = _dbrx_truth(m, ids)
    before = _model_state(m)
    ha = probes.attach(m, run="a", root=store_root)
    with torch.no_grad():
        m(input_ids=ids)
    hb = probes.attach(m, run="b", root=store_root)
    with torch.no_grad():
        m(input_ids=ids)
    first, second = (hb, ha) if order == "lifo" else (ha, hb)
    first.detach()
    with torch.no_grad():
        m(input_ids=ids)                 # only the handle still attached records this one
    second.detach()
    with torch.no_grad():
        m(input_ids=ids)                 # nobody records this one
    assert _model_state(m) == before     # exactly as found, in either detach order
    got_a = {k: v for k, v in stored(store_root, "a").items()}
    got_b = {k: v for k, v in stored(store_root, "b").items()}
    n_a = 3 if second is ha else 2       # forwards 1, 2 (+3 if a is detached last)
    n_b = 2 if second is hb else 1       # forward 2 (+3 if b is detached last)
    for layer in (0, 1):
        assert sum(v for k, v in got_a.items() if k[2] == layer).tolist() == (n_a * truth[layer]).tolist()
        assert sum(v for k, v in got_b.items() if k[2] == layer).tolist() == (n_b * truth[layer]).tolist()
    assert sum(v.sum() for k, v in got_a.items() if k[2] == 0) == n_a * 2 * 12 * 2   # batch 2 x 12 tokens x top-2


def test_a_users_own_method_patch_is_kept_and_called(store_root):
    m = T.dbrx().eval()
    ffn = next(x for x in m.modules() if type(x).__name__ == "DbrxFFN")
    calls = []
    original = ffn.route_tokens_to_experts

    def my_patch(router_logits):
        calls.append(1)
        return original(router_logits)

    ffn.route_tokens_to_experts = my_patch
    ids = torch.randint(1, T.VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with probes.attach(m, run="p", root=store_root), torch.no_grad():
        m(input_ids=ids)
    assert calls == [1]                          # called while attached
    assert ffn.__dict__["route_tokens_to_experts"] is my_patch   # restored, not deleted
    with torch.no_grad():
        m(input_ids=ids)
    assert calls == [1, 1]
    assert sum(v.sum() for k, v in stored(store_root, "p").items() if k[2] == 0) == 6 * 2


def test_hooks_stack_with_a_users_own_hooks(store_root):
    m = T.NativeMoE()
    seen = []
    mine = m.routers[0].register_forward_hook(lambda mod, a, out: seen.append(out[2].shape[0]))
    with probes.attach(m, run="s", root=store_root):
        m(torch.randint(1, T.VOCAB, (2, 4)))
    m(torch.randint(1, T.VOCAB, (2, 4)))
    assert seen == [8, 8]
    mine.remove()
    assert all(not x._forward_hooks and not x._forward_pre_hooks for x in m.modules())


def test_default_root_is_chrono_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONO_ROOT", str(tmp_path / "env_store"))
    monkeypatch.chdir(tmp_path)
    m = T.NativeMoE()
    with probes.attach(m, run="envroot"):
        m(torch.randint(1, T.VOCAB, (2, 4)))
    assert stored(tmp_path / "env_store", "envroot")
    assert not (tmp_path / "chrono_runs").exists()


def test_real_handle_satisfies_the_exporter_contract(store_root):
    m = T.NativeMoE(n_experts=4, top_k=1)
    with probes.attach(m, run="x", root=store_root, flush_every=2) as h:
        assert isinstance(h, LiveRouting) and missing_members(h) == []
        for i in range(2):
            m(torch.randint(1, T.VOCAB, (2, 8), generator=torch.Generator().manual_seed(i)))
            h.step()
        server = h.serve_metrics(0, expert_labels=True)
        try:
            with urllib.request.urlopen(server.url, timeout=10) as r:
                text = r.read().decode()
        finally:
            server.close()
        counts = h.latest_expert_counts()
    from prometheus_client.parser import text_string_to_metric_families
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    shares = {(int(s.labels["layer"]), int(s.labels["expert"])): s.value
              for s in fams["chrono_expert_share"].samples}
    truth = stored(store_root, "x")
    for layer in (0, 1):
        tot = sum(v for k, v in truth.items() if k[2] == layer)
        assert list(counts[layer]) == tot.tolist()
        for e in range(4):
            assert shares[(layer, e)] == pytest.approx(tot[e] / tot.sum())


def test_exporter_refuses_an_object_missing_part_of_the_contract():
    from chrono.exporters.prometheus import ExporterError, LiveSource

    class Half:
        run_id = "h"

        def stats(self):
            return {}

    with pytest.raises(ExporterError, match="latest_expert_counts"):
        LiveSource(Half())
