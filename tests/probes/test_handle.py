"""Handle behaviour: modes, steps, windows, callbacks, faults, detach, sampling, specs."""
from __future__ import annotations

import gc
import logging
import math
import weakref

import numpy as np
import polars as pl
import pytest
import torch

import chrono
import probes
import probe_models as T
from chrono.store import table_dir


def _ids(b=2, s=8, seed=0):
    return torch.randint(1, T.VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _captured_counts(model, run_fn, n_experts):
    """Test-side truth: capture indices each native router returns, count with NumPy."""
    got = {}
    hs = [r.register_forward_hook(lambda m, a, out, i=i: got.setdefault(i, []).append(out[2].detach().clone()))
          for i, r in enumerate(model.routers)]
    run_fn()
    for h in hs:
        h.remove()
    return {i: np.bincount(torch.cat(v).reshape(-1).numpy(), minlength=n_experts) for i, v in got.items()}


def _store_counts(root, run, mode=None):
    t = chrono.read(root, "routing", run=run).collect()
    if mode:
        t = t.filter(pl.col("mode") == mode)
    out = {}
    for r in t.group_by(["layer", "expert"]).agg(pl.col("tokens").sum()).iter_rows(named=True):
        out.setdefault(r["layer"], {})[r["expert"]] = r["tokens"]
    return {l: np.array([d.get(e, 0) for e in range(max(d) + 1)]) for l, d in out.items()}


def test_native_protocol_sites_and_manifest(store_root):
    m = T.NativeMoE(layers=3, n_experts=5, top_k=2)
    with probes.attach(m, run="nat", root=store_root) as h:
        assert [(s.name, s.layer, s.n_experts, s.top_k, s.adapter) for s in h.routers] == [
            (f"routers.{i}", i, 5, 2, "native") for i in range(3)]
        m(_ids())
    man = chrono.connect(store_root).sql("select n_layers, n_experts, top_k, adapter from runs").fetchall()
    assert man == [(3, 5, 2, "native")]


def test_modes_train_eval_infer(store_root):
    m = T.NativeMoE()
    with probes.attach(m, run="modes", root=store_root) as h:
        m.train()
        m(_ids()).sum().backward(); h.step()
        m.eval()
        with torch.no_grad():
            m(_ids()); h.step()
        with torch.inference_mode():
            m(_ids()); m(_ids()); h.step()
    t = chrono.read(store_root, "routing", run="modes").collect()
    per = {r["mode"]: (r["step"], r["tokens"]) for r in
           t.group_by("mode").agg(pl.col("step").first(), pl.col("tokens").sum()).iter_rows(named=True)}
    # 2 layers x 16 tokens x top-2 per forward
    assert per == {"TRAIN": (0, 64), "EVAL": (1, 64), "INFER": (2, 128)}


def test_auto_step_without_step_calls(store_root):
    m = T.NativeMoE()
    with probes.attach(m, run="auto", root=store_root, flush_every=2) as h:
        for i in range(5):
            m(_ids(seed=i))
    assert h.stats()["steps"] == 5
    steps = sorted(set(chrono.read(store_root, "routing", run="auto").collect()["step"].to_list()))
    assert steps == [0, 1, 2, 3, 4]


def test_windows_snapshots_callbacks_and_alerts(store_root):
    m = T.NativeMoE(n_experts=4, top_k=1)
    with torch.no_grad():  # collapse routing onto expert 0 so alerts must fire
        for r in m.routers:
            r.proj.weight.zero_(); r.proj.bias.zero_(); r.proj.bias[0] = 10.0
    seen = []
    with probes.attach(m, run="win", root=store_root, flush_every=3) as h:
        h.on_snapshot(lambda step, rows, handle: seen.append((step, len(rows), handle is h)))
        for i in range(16):
            m(_ids(seed=i)); h.step()
        live = h.metrics()
        assert live[0].token_count == 16  # one finished step of the open window
        h.record_decisions([{"run_id": "win", "step": 14, "layer": 0, "actuator": "none", "debt": 1.0,
                             "pressure": 0.5, "heat": 0.0, "forgetting": 0.0, "lens_scale": 1.0,
                             "backoff": 0.0, "abstain": True, "reason": "test"}])
    assert [s for s, _, _ in seen] == [2, 5, 8, 11, 14, 15]
    assert all(n == 3 and same for _, n, same in seen)  # 2 layers + global row
    assert h.latest_snapshot()[-1]["layer"] == -1 and h.latest_snapshot()[0]["top2_share"] == 1.0
    both = {"PRE_COLLAPSE", "COLLAPSE_CONFIRMED"}  # 6 collapsed windows: >= 3 and >= 5 in a row
    assert h.active_alerts() == {0: both, 1: both}
    assert h.alert_transitions()[(0, "PRE_COLLAPSE", "raised")] == 1
    assert h.latest_decisions()[0]["reason"] == "test"
    con = chrono.connect(store_root)
    assert con.sql("select count(*) from decisions").fetchall() == [(1,)]
    assert con.sql("select count(*) from alerts where transition='raised'").fetchall()[0][0] >= 2
    st = h.stats()
    assert st["steps"] == 16 and st["tokens_total"] == {0: 256, 1: 256}
    assert st["rows_written"]["snapshots"] == 18 and st["write_errors"] == 0 and st["hook_seconds"] > 0


def test_detach_removes_every_hook_and_frees_model(store_root):
    m = T.NativeMoE()
    before = _hook_count(m)
    lens = {0: torch.nn.Identity()}
    h = probes.attach(m, run="det", root=store_root, lenses=lens)
    assert _hook_count(m) > before
    m(_ids())
    h.detach()
    assert _hook_count(m) == before
    h.detach()  # idempotent
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None, "the handle must not keep the model alive after detach"


def test_hf_detach_removes_every_hook(store_root):
    for fam in ("mixtral", "dbrx"):
        m = T.FAMILIES[fam]()
        before = _hook_count(m)
        with probes.attach(m, run=fam, root=store_root):
            m(**T.batch(m))
        assert _hook_count(m) == before
        assert "route_tokens_to_experts" not in vars(m.get_submodule("transformer.blocks.0.ffn")) \
            if fam == "dbrx" else True


def test_exception_inside_with_block_flushes_and_detaches(store_root):
    m = T.NativeMoE()
    before = _hook_count(m)
    with pytest.raises(RuntimeError, match="boom"):
        with probes.attach(m, run="exc", root=store_root, flush_every=100):
            m(_ids()); m(_ids())
            raise RuntimeError("boom")
    assert _hook_count(m) == before
    assert chrono.read(store_root, "routing", run="exc").collect()["tokens"].sum() == 2 * 2 * 16 * 2


def test_nonfinite_router_outputs_are_flagged_not_raised(store_root, caplog):
    m = T.NativeMoE()
    m.routers[1].poison = True
    with caplog.at_level(logging.WARNING, logger="probes"):
        with probes.attach(m, run="nan", root=store_root) as h:
            m(_ids()); h.step()
    assert h.stats()["nonfinite"] > 0
    sig = chrono.connect(store_root).sql(
        "select layer, value from signals where name='probes.nonfinite'").fetchall()
    assert sig and sig[0][0] == 1 and sig[0][1] > 0
    assert "non-finite" in caplog.text


def test_invalid_indices_are_counted_not_crashing(store_root):
    def parse(module, args, out):
        idx = out[2].clone()
        idx[0, 0] = 99  # out of range
        idx[1, 0] = -1
        return out[0], out[1], idx

    m = T.NativeMoE()
    with probes.attach(m, run="inv", root=store_root,
                       specs=[probes.RouterSpec("routers.*", parse=parse)]) as h:
        m(_ids()); h.step()
    assert h.stats()["invalid_indices"] == 4 and h.stats()["faults"] == 0


def test_write_failure_is_counted_and_training_goes_on(store_root, caplog):
    m = T.NativeMoE()
    with caplog.at_level(logging.ERROR):
        with probes.attach(m, run="wf", root=store_root, flush_every=1) as h:
            m(_ids()); h.step(); h.flush()
            routing_dir = table_dir(store_root, "routing", "wf")
            import shutil
            shutil.rmtree(routing_dir)
            routing_dir.write_text("not a directory")  # every later routing part write fails
            for i in range(5):
                m(_ids(seed=i)); h.step()
            h.flush()
            assert h.stats()["write_errors"] >= 1
    assert "telemetry write failed" in caplog.text


def test_unwritable_root_does_not_stop_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    m = T.NativeMoE()
    with probes.attach(m, run="ro", root=blocker / "sub") as h:  # cannot mkdir under a file
        m(_ids()); h.step()
        assert h.stats()["write_errors"] >= 1


def test_token_sampling_rate_and_bound(store_root):
    m = T.NativeMoE(layers=2, top_k=2)
    B, S = 4, 25
    with probes.attach(m, run="tok", root=store_root, tokens=0.1) as h:
        ids = [_ids(B, S, seed=i) for i in range(3)]
        for x in ids:
            m(x); h.step()
    t = chrono.read(store_root, "tokens", run="tok").collect()
    per = t.group_by(["step", "layer"]).len()
    assert per["len"].to_list() == [math.ceil(0.1 * B * S) * 2] * 6
    # batch_idx / position / token_id are consistent with the input
    for r in t.iter_rows(named=True):
        assert ids[r["step"]][r["batch_idx"], r["position"]].item() == r["token_id"]
    with probes.attach(m, run="tok2", root=store_root, tokens=1.0, max_tokens_per_step=7,
                       auto_step=False) as h:
        for x in ids:
            m(x); m(x); h.step()  # two forwards per step share one budget
    per = chrono.read(store_root, "tokens", run="tok2").collect().group_by(["step", "layer"]).len()
    assert per["len"].max() == 7 * 2 and per.height == 6


def test_sampled_tokens_match_aggregate_when_rate_is_one(store_root):
    m = T.NativeMoE()
    with probes.attach(m, run="all", root=store_root, tokens=1.0) as h:
        m(_ids(3, 9)); h.step()
    con = chrono.connect(store_root)
    a = con.sql("select layer, expert, sum(tokens) from routing group by all order by all").fetchall()
    b = con.sql("select layer, expert, count(*) from tokens group by all order by all").fetchall()
    assert a == b


def test_native_drops_and_expert_growth(store_root):
    m = T.NativeMoE(n_experts=4, top_k=2, drop_every=4)
    with probes.attach(m, run="grow", root=store_root) as h:
        m(_ids(2, 8)); h.step()
        for r in m.routers:
            r.n_experts = 40  # lifecycle growth beyond the buffer's capacity
        m(_ids(2, 8)); h.step()
        assert h.routers[0].n_experts == 40
    t = chrono.read(store_root, "routing", run="grow").collect()
    s0 = t.filter(pl.col("step") == 0)
    assert s0["dropped"].sum() == 2 * 4 * 2 and s0["tokens"].sum() == 2 * 12 * 2  # 16 tokens, every 4th dropped
    assert t.filter(pl.col("step") == 1)["expert"].max() == 39


def test_counts_equal_under_no_grad_inference_mode_and_autocast(store_root):
    m = T.NativeMoE()
    x = _ids(4, 16)
    for name, ctx in [("nograd", torch.no_grad), ("infer", torch.inference_mode),
                      ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))]:
        with probes.attach(m, run=name, root=store_root) as h:
            truth = _captured_counts(m, lambda: _run_in(ctx, m, x), 64)
            h.step()
        got = _store_counts(store_root, name)
        for layer in (0, 1):
            np.testing.assert_array_equal(got[layer], truth[layer][: len(got[layer])])
            assert truth[layer][len(got[layer]):].sum() == 0


def _run_in(ctx, m, x):
    with ctx():
        m(x)


def test_hf_mixtral_bf16_autocast_and_inference_mode(store_root):
    m = T.mixtral()
    x = T.batch(m)
    for name, ctx in [("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
                      ("inf", torch.inference_mode)]:
        got_idx = {}
        with probes.attach(m, run=name, root=store_root) as h:
            hs = [m.get_submodule(s.name).register_forward_hook(
                lambda mod, a, out, l=s.layer: got_idx.update({l: out[2].clone()})) for s in h.routers]
            with ctx():
                m(**x)
            for hh in hs:
                hh.remove()
        got = _store_counts(store_root, name)
        for l, idx in got_idx.items():
            np.testing.assert_array_equal(got[l], np.bincount(idx.reshape(-1).numpy(), minlength=6))


def test_compiled_counts_equal_eager(store_root):
    m = T.NativeMoE()
    x = _ids(4, 16)
    eager = _captured_counts(m, lambda: m(x), 64)
    torch._dynamo.reset()
    with probes.attach(m, run="comp", root=store_root) as h:  # hooks before compile
        cm = torch.compile(m, backend="eager")
        cm(x); h.step()
        cm(x); h.step()
    got = _store_counts(store_root, "comp")
    for layer in (0, 1):
        np.testing.assert_array_equal(got[layer], 2 * eager[layer][: len(got[layer])])


def test_attach_after_compile_still_counts(store_root):
    """Hooks added to an already compiled model must fire (probes turns hook guards on)."""
    m = T.NativeMoE()
    x = _ids(4, 16)
    eager = _captured_counts(m, lambda: m(x), 64)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="eager")
    cm(x)  # compiled without hooks
    with probes.attach(m, run="late", root=store_root) as h:
        cm(x); h.step()
    got = _store_counts(store_root, "late")
    for layer in (0, 1):
        np.testing.assert_array_equal(got[layer], eager[layer][: len(got[layer])])


@pytest.mark.slow
def test_compiled_hf_mixtral_counts_equal_eager(store_root):
    m = T.mixtral().eval()
    x = T.batch(m)
    with probes.attach(m, run="eager", root=store_root):
        with torch.no_grad():
            m(**x)
    torch._dynamo.reset()
    with probes.attach(m, run="compiled", root=store_root):
        cm = torch.compile(m)
        with torch.no_grad():
            cm(**x)
    assert _store_counts(store_root, "compiled").keys() == _store_counts(store_root, "eager").keys()
    for l, c in _store_counts(store_root, "eager").items():
        np.testing.assert_array_equal(_store_counts(store_root, "compiled")[l], c)


def test_lens_replaces_router_input(store_root):
    m = T.NativeMoE()
    seen = []
    with probes.attach(m, run="lens", root=store_root, lenses={1: _Zero()}):
        hk = m.routers[1].register_forward_pre_hook(lambda mod, a: seen.append(a[0].abs().sum().item()))
        m(_ids())
        hk.remove()
    assert seen == [0.0]


class _Zero(torch.nn.Module):
    def forward(self, x):
        return x * 0


def test_router_spec_generic_fallback_and_clear_error(store_root, caplog):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 5, bias=False)
            self.top_k = 2

        def forward(self, x):
            return x + self.gate(x).sum(-1, keepdim=True)

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    m = Plain()
    with caplog.at_level(logging.WARNING, logger="probes"):
        with probes.attach(m, run="gen", root=store_root) as h:
            m(torch.randn(3, 8))
    assert [(s.name, s.layer, s.n_experts, s.top_k, s.adapter) for s in h.routers] == [
        ("blocks.0.gate", 0, 5, 2, "generic.linear_topk"), ("blocks.1.gate", 1, 5, 2, "generic.linear_topk")]
    assert "guessed router blocks.0.gate" in caplog.text
    assert chrono.read(store_root, "routing", run="gen").collect()["tokens"].sum() == 2 * 3 * 2
    with pytest.raises(probes.ProbeError, match="RouterSpec") as e:
        probes.attach(m, run="off", root=store_root, generic=False)
    assert "blocks.0.gate (Linear)" in str(e.value)
    with pytest.raises(probes.ProbeError, match="matches RouterSpec"):
        probes.attach(m, run="bad", root=store_root, specs=[probes.RouterSpec("nope.*")])
    spec = probes.RouterSpec("blocks.*.gate", n_experts=5, top_k=1,
                             parse=lambda mod, a, out: {"indices": out.argmax(-1, keepdim=True)})
    with probes.attach(m, run="spec", root=store_root, specs=[spec]) as h:
        m(torch.randn(4, 8))
    assert h.routers[0].adapter == "spec"
    assert chrono.read(store_root, "routing", run="spec").collect()["tokens"].sum() == 2 * 4


def test_distributed_true_without_process_group_is_a_clear_error(store_root):
    with pytest.raises(probes.ProbeError, match="needs torch.distributed to be initialised"):
        probes.attach(T.NativeMoE(), run="d", root=store_root, distributed=True)


def test_inference_mode_first_then_training_counts_exactly(store_root):
    """The recorder's scratch buffers and a growth of its buffers can first happen inside
    ``torch.inference_mode`` (an evaluation before training); later training forwards
    still count (an inference tensor written in place outside inference mode would raise:
    a telemetry fault, counts lost)."""
    m = T.NativeMoE()
    x = _ids(4, 16)
    with probes.attach(m, run="inf-then-train", root=store_root, steps="manual") as h:
        with torch.inference_mode():
            first = _captured_counts(m, lambda: m(x), 64)
            for r in m.routers:
                r.n_experts = 40          # grow the recorder inside inference mode
            grown = _captured_counts(m, lambda: m(x), 64)
        h.step()
        m.train()
        trained = _captured_counts(m, lambda: m(x), 64)   # grad mode: TRAIN
        h.step()
    assert h.stats()["faults"] == 0
    t = chrono.read(store_root, "routing", run="inf-then-train").collect()
    for layer in (0, 1):
        for step, truth in ((0, first[layer] + grown[layer]), (1, trained[layer])):
            row = t.filter((pl.col("step") == step) & (pl.col("layer") == layer))
            got = np.zeros(64, dtype=np.int64)
            np.add.at(got, row["expert"].to_numpy(), row["tokens"].to_numpy())
            np.testing.assert_array_equal(got, truth)
            assert truth.sum() == 4 * 16 * 2 * (2 if step == 0 else 1)   # tokens x top-2 (x 2 forwards)
