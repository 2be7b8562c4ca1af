"""Bio-MoE: quick run into the store, staged growth in lifecycle, checkpoints, gating parts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chrono
from chrono.lifecycle import Proposal, apply_proposals
from reference_models.bio_moe import (ZONES, BioMoE, BioMoEConfig, BioTrainConfig, MeritBoard,
                                      run_workload, train_bio, zone_config)
from reference_models.bio_moe.train import _BioLifecycle


def grown(n=6, **kw) -> BioMoE:
    m = BioMoE(BioMoEConfig(**kw))
    for i in range(n - 1):
        m.grow_clone(0, seed=i)
    return m


def trained(tmp_path_factory, name: str, run) -> tuple:
    """(store root, result of ``run(root)``) for a module-scoped training run, one torch thread."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(name)
    return root, run(root)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return trained(tmp_path_factory, "bio", lambda root: run_workload(
        "intended", run="bio", root=root, epochs=6, growth_epochs=(1, 2), bootstrap_steps=5))


def test_quick_run_lands_in_store_with_staged_growth(quick_run):
    root, res = quick_run
    con = chrono.connect(root)
    per_step = con.execute("SELECT step, count(DISTINCT expert) FROM routing WHERE run_id='bio' AND mode='TRAIN' "
                           "AND layer = 0 GROUP BY step ORDER BY step").fetchall()
    assert len(per_step) == 6 * (1347 // 64)
    growth = con.execute("SELECT step, event, n_experts_after, source_expert FROM lifecycle "
                         "WHERE run_id='bio' AND applied ORDER BY step, event").fetchall()
    assert [g[2] for g in growth if g[1] == "grow"] == [3, 6]
    assert sum(1 for g in growth if g[1] == "clone") == 5
    # routing covers exactly the active experts of each stage: 1, then 3, then 6 (+ lifecycle)
    n_at = lambda s: max([1] + [n for (st, ev, n, _) in growth if st <= s])
    assert all(n == n_at(s) for s, n in per_step)
    names = {n for (n,) in con.execute("SELECT DISTINCT name FROM signals WHERE run_id='bio'").fetchall()}
    assert {"loss", "accuracy", "bio_moe.gate_entropy", "bio_moe.utilisation.e0",
            "bio_moe.routed_accuracy.e0"} <= names
    ((acc,),) = con.execute("SELECT max(value) FROM signals WHERE run_id='bio' AND name='accuracy'").fetchall()
    assert 0.5 < acc <= 1.0  # well above chance (0.1) after 6 short epochs
    assert res.final["n_experts"] >= 2


def test_checkpoint_save_load_gives_identical_outputs(tmp_path):
    m = grown(4)
    x = torch.rand(16, 64)
    m.eval()
    ref = m(x)
    m.save(tmp_path / "all.pt")
    m2 = BioMoE.load(tmp_path / "all.pt")
    m2.eval()
    assert torch.equal(m2(x), ref)
    m.save_expert(2, tmp_path / "e2.pt")
    with torch.no_grad():
        for p in m.experts[2].parameters():
            p.add_(1.0)
    assert not torch.equal(m(x), ref)
    m.load_expert(2, tmp_path / "e2.pt")
    assert torch.equal(m(x), ref)
    other = BioMoE(BioMoEConfig(d_hidden=32))
    with pytest.raises(ValueError, match="d_hidden"):
        other.load_expert(0, tmp_path / "e2.pt")


def test_freeze_mask_blocks_updates():
    m = grown(3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.set_frozen([1])
    before = [p.clone() for p in m.experts[1].parameters()]
    others = [p.clone() for p in m.experts[0].parameters()]
    loss = m(torch.rand(32, 64)).pow(2).mean()
    loss.backward()
    m.zero_frozen_grads()
    opt.step()
    assert bool(m.freeze_mask()[1]) and not bool(m.freeze_mask()[0])
    assert all(torch.equal(a, b) for a, b in zip(before, m.experts[1].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(others, m.experts[0].parameters()))


def test_router_protocol_soft_top2_and_hierarchical_groups():
    m = grown(6)
    r = m.router
    assert r.chrono_router and r.n_experts == 6 and r.top_k == 2
    logp, w, idx = r(torch.randn(20, 64))
    assert logp.shape == (20, 6) and w.shape == (20, 2) and idx.shape == (20, 2)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(20), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(20)) and (w > 0).all()
    # hierarchical: probability mass of a group equals the group gate's softmax
    groups = torch.tensor(r.active) // r.cfg.group_size
    present = groups.unique()
    g = torch.softmax(r.group_gate(torch.zeros(1, 64))[0, present] / r.temperature, -1)
    p = r.probs(torch.zeros(1, 64))[0][0]
    for j, gi in enumerate(present):
        assert torch.isclose(p[groups == gi].sum(), g[j], atol=1e-5)


def test_prune_masks_expert_from_gating_and_spawn_adds_one(store_root):
    m = grown(4)
    life = _BioLifecycle(m, seed=0)
    with chrono.open_run(store_root, "life") as w:
        rows = apply_proposals(life, [Proposal("prune", 0, 1, None, "low use")], step=3, writer=w)
        assert rows[0]["applied"] and m.router.n_experts == 3 and 1 not in m.router.active
        idx = m.router(torch.randn(200, 64))[2]
        assert int(idx.max()) < 3
        rows = apply_proposals(life, [Proposal("spawn", 0, -1, None, "entropy")], step=4, writer=w)
        assert rows[0]["applied"] and m.router.n_experts == 4
    t = chrono.read(store_root, "lifecycle", run="life").collect().sort("step")
    assert t["event"].to_list() == ["prune", "spawn"] and t["n_experts_after"].to_list() == [3, 4]


def test_meritboard_ucb_favours_untried_and_exp3_moves_towards_reward():
    cfg = BioMoEConfig(bandit="ucb", bandit_momentum=0.0)
    b = MeritBoard(3, cfg)
    routed = np.array([0] * 50 + [1] * 50)          # expert 2 never tried
    b.update([0, 1, 2], routed, np.ones(100, bool))
    assert b.bias[2] > b.bias[0] and b.bias[2] > b.bias[1]
    e = MeritBoard(2, BioMoEConfig(bandit="exp3", bandit_momentum=0.0))
    for _ in range(20):
        e.update([0, 1], np.array([0] * 10 + [1] * 10), np.array([True] * 10 + [False] * 10))
    assert e.bias[0] > e.bias[1]
    g = MeritBoard(2, BioMoEConfig(bandit="greedy", bandit_momentum=0.0))
    g.update([0, 1], np.array([0] * 30 + [1] * 3), np.ones(33, bool))
    assert g.bias[0] > g.bias[1]   # traffic earns credit earns traffic


@pytest.mark.parametrize("zone", sorted(ZONES))
def test_zone_presets_build_and_run(zone):
    m = BioMoE(zone_config(zone))
    m.grow_clone(0, seed=1)
    assert m(torch.rand(4, 64)).shape == (4, 10)
    with pytest.raises(ValueError, match="unknown zone"):
        zone_config("cerebellum")


def test_faithful_freezes_router_and_routes_per_batch():
    cfg = BioTrainConfig(mode="faithful", epochs=2, growth_epochs=(1,), growth_sizes=(3,), bootstrap_steps=2)
    torch.set_num_threads(1)
    res = train_bio(cfg)
    m = res.model
    assert not any(p.requires_grad for p in m.router.gate.parameters())
    assert m.router.cfg.bandit == "greedy" and m.router.n_experts == 3
    with pytest.raises(ValueError, match="mode"):
        train_bio(BioTrainConfig(mode="sideways"))


def test_chrono_workload_cli(store_root, capsys):
    from chrono_cli.main import main

    assert main(["--root", str(store_root), "workload", "bio-moe", "--steps", "63", "--run", "cli-bio"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "chrono --root" in out
    ((n,),) = chrono.connect(store_root).execute(
        "SELECT count(DISTINCT step) FROM routing WHERE run_id='cli-bio' AND mode='TRAIN'").fetchall()
    assert n == 63
    assert main(["--root", str(store_root), "workload", "nope"]) == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err
    assert main(["--root", str(store_root), "workload", "bio-moe", "--steps", "0"]) == 2
    assert main(["--root", str(store_root), "workload", "bio-moe", "--run", "bad id!"]) == 2


# ---- neurogenesis: the documented setting (docs/workloads.md) fires, teaches, and is used
@pytest.fixture(scope="module")
def neuro_run(tmp_path_factory):
    from reference_models.bio_moe import neurogenesis_config

    return trained(tmp_path_factory, "neuro",
                   lambda root: train_bio(neurogenesis_config(epochs=8, run="neuro", root=str(root))))


def test_neurogenesis_setting_fires_teaches_and_new_expert_gets_traffic(neuro_run):
    root, res = neuro_run
    con = chrono.connect(root)
    spawns = con.execute("SELECT step, expert, source_expert, n_experts_after, reason FROM lifecycle "
                         "WHERE run_id='neuro' AND event='spawn' AND applied ORDER BY step").fetchall()
    assert spawns, "neurogenesis did not fire in its documented setting"
    step, new, teacher, n_after, reason = spawns[0]
    # the trigger: that epoch's mean normalised gate entropy, as logged, is above the threshold
    from reference_models.bio_moe.train import NEUROGENESIS_ENTROPY

    ((ent,),) = con.execute("SELECT value FROM signals WHERE run_id='neuro' AND name='bio_moe.gate_entropy' "
                            "AND step = ?", [step]).fetchall()
    assert ent > NEUROGENESIS_ENTROPY and "gate entropy" in reason
    assert teacher is not None and teacher != new and n_after == 4
    # the teach phase: the fresh expert moved towards its teacher
    (t,) = res.teach
    assert t["mse_after"] < 0.5 * t["mse_before"]
    # afterwards the new expert gets traffic in every later training step's routing
    rows = con.execute("SELECT step, sum(tokens) FILTER (WHERE expert = ?), sum(tokens) FROM routing "
                       "WHERE run_id='neuro' AND mode='TRAIN' AND layer=0 AND step > ? GROUP BY step ORDER BY step",
                       [new, step]).fetchall()
    assert len(rows) >= 21 and all(mine is not None and mine > 0 for _, mine, _ in rows)
    share = sum(m for _, m, _ in rows) / sum(tot for _, _, tot in rows)
    assert share > 0.05, share


def test_neurogenesis_events_show_in_the_dashboard(neuro_run, monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    root, _ = neuro_run
    monkeypatch.setenv("CHRONO_ROOT", str(root))
    app = str(Path(__file__).resolve().parents[2] / "dashboard" / "streamlit_app.py")
    at = AppTest.from_file(app, default_timeout=60)
    at.query_params["run"] = "neuro"
    at.run()
    at.switch_page("views/lifecycle.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics.get("spawn") == "1" and metrics.get("clone") == "2"
    events = at.dataframe[0].value
    spawn = events[events["event"] == "spawn"]
    assert len(spawn) == 1 and spawn["reason"].iloc[0].startswith("gate entropy")
