"""Semantic MoE (ASTRA-X): quick preset into the store, FAISS determinism, lifecycle surgery."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chrono
from chrono.lifecycle import Proposal, apply_proposals
from reference_models.corpus import byte_batches, split_bytes, text_bytes
from reference_models.semantic_moe import (SemanticMoEConfig, SemanticMoELM, TrainingConfig,
                                           run_workload, spherical_kmeans, train)
from reference_models.semantic_moe.model import PRESETS


def quick_model(seed: int = 0, **kw) -> SemanticMoELM:
    cfg = SemanticMoEConfig(**{**PRESETS["quick"], **kw})
    torch.manual_seed(seed)          # the caller seeds the weights (the constructor does not)
    return SemanticMoELM(cfg)


def fill_and_fit(model, seed=0, batches=3):
    data, _ = split_bytes(text_bytes())
    with torch.no_grad():
        for x, _ in byte_batches(data, model.cfg.block_size, 8, seed, batches):
            model(x)
    for r in model.routers():
        r.fit_teacher(seed)


def test_router_follows_native_protocol():
    m = quick_model(top_k=4)  # any k <= n_experts
    r = m.routers()[0]
    assert r.chrono_router is True and r.n_experts == 4 and r.top_k == 4 and r.layer_id == 0
    logits, w, idx = r(torch.randn(10, m.cfg.d_model))
    assert logits.shape == (10, 4) and w.shape == (10, 4) and idx.shape == (10, 4)
    assert idx.dtype == torch.long and torch.allclose(w.sum(-1), torch.ones(10))
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3]


def test_weights_follow_the_callers_seed_and_surgery_leaves_the_global_rng_alone():
    a, b, c = quick_model(seed=1), quick_model(seed=1), quick_model(seed=2)
    assert torch.equal(a.tok.weight, b.tok.weight) and not torch.equal(a.tok.weight, c.tok.weight)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    layer = a.moe_layers()[0]
    layer.spawn(seed=7)
    assert torch.equal(torch.get_rng_state(), state)   # spawn draws from its own seed only
    b.moe_layers()[0].spawn(seed=7)
    assert torch.equal(layer.experts[-1].fc.weight, b.moe_layers()[0].experts[-1].fc.weight)


def test_distillation_target_is_passed_back_not_kept():
    from reference_models.semantic_moe.router import RouterTrace

    m = quick_model(n_layer=2)
    fill_and_fit(m)
    x = torch.randint(0, 256, (3, 16))
    trace = []
    m(x, trace=trace)
    assert [t.layer for t in trace] == [0, 1] and all(isinstance(t, RouterTrace) for t in trace)
    assert trace[0].teacher.shape == trace[0].student.shape == (48, 4) and trace[0].idx.shape == (48, 2)
    assert not any(hasattr(r, "last") for r in m.routers())
    m(x)                                                   # no trace: nothing appended anywhere
    assert len(trace) == 2
    loss = sum(F.cross_entropy(t.student, t.teacher.argmax(-1)) for t in trace)
    loss.backward()                                        # the student learns from the teacher only
    assert m.routers()[0].student.weight.grad.abs().sum() > 0
    assert m.routers()[0].centroids.grad is None and m.tok.weight.grad is None


def test_faiss_kmeans_is_deterministic_under_a_seed():
    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    a, b = spherical_kmeans(x, 4, seed=3), spherical_kmeans(x, 4, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, spherical_kmeans(x, 4, seed=4))
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    m1, m2 = quick_model(), quick_model()
    fill_and_fit(m1)
    fill_and_fit(m2)
    assert torch.equal(m1.routers()[0].centroids, m2.routers()[0].centroids)


def test_centroids_persist(tmp_path):
    m = quick_model()
    fill_and_fit(m)
    r = m.routers()[0]
    r.save_centroids(tmp_path / "c.npz")
    m2 = quick_model()
    m2.routers()[0].load_centroids(tmp_path / "c.npz")
    assert torch.equal(m2.routers()[0].centroids, r.centroids)
    with pytest.raises(ValueError, match="do not fit"):
        quick_model(n_experts=3).routers()[0].load_centroids(tmp_path / "c.npz")


def test_recluster_keeps_expert_identity():
    m = quick_model()
    fill_and_fit(m, seed=0)
    r = m.routers()[0]
    perm = torch.tensor([2, 0, 3, 1])
    r.centroids.copy_(r.centroids[perm])      # experts now own the clusters in another order
    before = r.centroids.clone()
    shift = r.fit_teacher(seed=5)             # warm-started re-fit on the same data
    assert torch.all((r.centroids * before).sum(1) > 0.95) and shift < 0.05
    r.centroids.copy_(r.centroids[torch.tensor([1, 0, 2, 3])])
    moved = r.centroids.clone()
    r.teacher_ready = False                   # cold re-fit: new k-means, matched to the owners
    r.fit_teacher(seed=0)
    assert torch.all((r.centroids * moved).sum(1) > 0.9)


@pytest.mark.parametrize("event,expert,source,delta", [
    ("split", 1, 1, +1), ("clone", 0, 0, +1), ("spawn", -1, None, +1),
    ("merge", 2, 3, -1), ("prune", 3, None, -1)])
def test_lifecycle_changes_expert_set_and_is_logged(store_root, event, expert, source, delta):
    m = quick_model()
    fill_and_fit(m)
    with chrono.open_run(store_root, "surgery") as w:
        rows = apply_proposals(m, [Proposal(event, 0, expert, source, "test")], step=5, writer=w)
    n = m.routers()[0].n_experts
    assert n == 4 + delta and len(m.moe_layers()[0].experts) == n
    assert m.routers()[0].centroids.shape[0] == n and m.routers()[0].student.out_features == n
    assert rows[0]["applied"] and rows[0]["n_experts_after"] == n
    x = torch.randint(0, 256, (2, m.cfg.block_size))
    _, loss = m(x, x)
    assert torch.isfinite(loss)
    idx = m.routers()[0](torch.randn(64, m.cfg.d_model))[2]
    assert int(idx.max()) < n
    t = chrono.read(store_root, "lifecycle", run="surgery").collect()
    assert t["event"].to_list() == [event] and t["n_experts_after"].to_list() == [n]


def test_split_divides_the_region_of_the_overloaded_expert():
    m = quick_model()
    fill_and_fit(m)
    layer = m.moe_layers()[0]
    r = layer.router
    z = torch.from_numpy(r.reservoir())
    owner_before = torch.cdist(z, r.centroids).argmin(1)
    new = layer.split(1, seed=0)
    owner_after = torch.cdist(z, r.centroids).argmin(1)
    mine = owner_after[owner_before == 1]
    # the expert's own vectors are shared between it and the new expert (a few near the
    # region's border may go to a neighbour); other experts keep theirs
    assert ((mine == 1) | (mine == new)).float().mean() > 0.9
    assert (mine == new).float().mean() > 0.1 and (mine == 1).float().mean() > 0.1
    others = owner_before != 1
    assert (owner_after[others] == owner_before[others]).float().mean() > 0.9


def test_quick_workload_lands_in_store(store_root):
    res = run_workload("intended", steps=40, run="sem", root=store_root, preset="quick", n_experts=4,
                       snapshot_every=10, eval_every=20)
    assert "agreement" in res.final and 0.0 <= res.final["agreement"] <= 1.0
    con = chrono.connect(store_root)
    layers = con.execute("SELECT DISTINCT layer FROM routing WHERE run_id='sem'").fetchall()
    assert layers == [(0,)]
    # every step's routing covers exactly the experts that existed at that step
    per_step = dict(con.execute("SELECT step, count(DISTINCT expert) FROM routing WHERE run_id='sem' AND mode='TRAIN' "
                                "GROUP BY step").fetchall())
    assert len(per_step) == 40
    events = con.execute("SELECT step, n_experts_after FROM lifecycle WHERE run_id='sem' AND applied "
                         "ORDER BY step").fetchall()
    expected = 4
    for step in sorted(per_step):
        for s, n in events:
            if s < step:
                expected = n
        assert per_step[step] == expected, (step, per_step[step], events)
        expected = 4
    names = {n for (n,) in con.execute("SELECT DISTINCT name FROM signals WHERE run_id='sem'").fetchall()}
    assert {"loss", "val_loss", "teacher_agreement", "semantic_moe.alpha"} <= names
    ((k,),) = con.execute("SELECT count(*) FROM snapshots WHERE run_id='sem' AND layer = 0 "
                          "AND step < 40").fetchall()
    assert k == 4  # one per 10 training steps


def test_train_api_shape_and_dense_baseline():
    data, val = split_bytes(text_bytes())
    cfg = TrainingConfig(preset="quick", calib_batches=2, lifecycle=False)
    loader = list(byte_batches(data, 32, 8, 0, 12))
    m = train(loader, 256, 4, cfg, val_batches=list(byte_batches(val, 32, 8, 1, 2)))
    assert len(m.history["loss"]) == 12 and "val loss" in m.summary()  # calibration batches train too
    dense = train(loader, 256, 4, TrainingConfig(preset="quick", dense=True), steps=5)
    assert dense.model.routers() == [] and dense.final["active_params"] == dense.final["total_params"]
    assert abs(dense.final["active_params"] - m.final["active_params"]) / m.final["active_params"] < 0.15


def test_faithful_mode_is_top1_and_unfitted():
    m = quick_model(faithful=True)
    r = m.routers()[0]
    assert r.top_k == 1 and not r.teacher_ready and float(r.centroids.abs().sum()) == 0.0
    _, w, idx = r(torch.randn(8, m.cfg.d_model))
    assert idx.shape == (8, 1) and torch.equal(w, torch.ones(8, 1))


# ---- faithful collapse (docs/workloads.md, "Faithful mode: why routing does not collapse")
def _per_step_experts(con, run):
    """{step: set of experts that got tokens} of layer 0's training routing."""
    out: dict[int, set] = {}
    for step, expert in con.execute("SELECT step, expert FROM routing WHERE run_id = ? AND mode = 'TRAIN' "
                                    "AND layer = 0 AND tokens > 0", [run]).fetchall():
        out.setdefault(step, set()).add(expert)
    return out


def test_faithful_defects_collapse_routing_and_chrono_flags_it(store_root):
    """Zero centroids tie every teacher score: with no tie-breaker (alpha 0, no load penalty)
    every token of every step goes to one expert, and the live snapshots raise both alerts."""
    run_workload("faithful", steps=30, run="tie", root=store_root, preset="quick", n_experts=4,
                 alpha_end=0.0, load_penalty=0.0, snapshot_every=5, eval_every=30)
    con = chrono.connect(store_root)
    used = _per_step_experts(con, "tie")
    assert len(used) == 30 and len(set().union(*used.values())) == 1
    alerts = dict(con.execute("SELECT alert, min(step) FROM alerts WHERE run_id='tie' AND transition='raised' "
                              "GROUP BY alert").fetchall())
    assert alerts.get("PRE_COLLAPSE") == 14 and alerts.get("COLLAPSE_CONFIRMED") == 24  # 3rd and 5th window


def test_load_penalty_rotates_the_collapsed_batch_and_per_step_windows_see_it(store_root):
    """With the load penalty on, each batch still goes to one expert but the expert rotates, so
    the workload's windows look healthy; per-step windows over the same rows raise the alert."""
    from chrono.snapshots import alerts_for, build_snapshots

    run_workload("faithful", steps=30, run="rot", root=store_root, preset="quick", n_experts=4,
                 alpha_end=0.0, snapshot_every=5, eval_every=30)
    con = chrono.connect(store_root)
    used = _per_step_experts(con, "rot")
    assert all(len(e) == 1 for e in used.values()) and len(set().union(*used.values())) == 4
    live = {a for (a,) in con.execute("SELECT alert FROM alerts WHERE run_id='rot' AND transition='raised'")
            .fetchall()}
    ((windows,),) = con.execute("SELECT count(DISTINCT step) FROM snapshots WHERE run_id='rot' AND step < 30").fetchall()
    assert windows == 6 and "COLLAPSE_CONFIRMED" not in live   # 6 windows could have confirmed it
    routing = con.sql("SELECT step, layer, expert, sum(tokens)::BIGINT AS tokens FROM routing WHERE run_id='rot' "
                      "AND mode='TRAIN' GROUP BY ALL").to_arrow_table()
    per_step = alerts_for(build_snapshots("rot", routing, 1)).to_pylist()
    assert any(a["alert"] == "COLLAPSE_CONFIRMED" and a["transition"] == "raised" for a in per_step)
