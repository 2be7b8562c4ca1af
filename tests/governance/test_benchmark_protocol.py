"""benchmarks/governance.py: the selection rule, the domination test, records, and a tiny run of each
workload (so the benchmark code path stays alive)."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import governance as G  # noqa: E402
import governance_report as R  # noqa: E402
import governance_workloads as W  # noqa: E402


def _run(seed, neff, loss, confirmed=None):
    return {"seed": seed, "final_neff": neff, "val_loss": loss, "first_collapse_confirmed": confirmed,
            "first_pre_collapse": None, "dead": [0, 0], "mean_effort": None, "wall_s": 1.0}


def _write(cache, wl, arm, seed, rec):
    p = G.cache_path(cache, wl, arm, seed)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(rec))


def test_round1_rule_prefers_lowest_loss_among_those_reaching_0_8n(tmp_path):
    assert G.select_r1(tmp_path, "w") is None                  # nothing yet: chrono waits
    neff = {"chrono-pi-aux": [7.0, 6.5], "chrono-pi-bias": [6.9, 6.6],
            "chrono-pi-bias+aux": [5.0, 5.0], "chrono-pi-aux-t0.9": [7.5, 7.4]}
    loss = {"chrono-pi-aux": 1.80, "chrono-pi-bias": 1.76, "chrono-pi-bias+aux": 1.70,
            "chrono-pi-aux-t0.9": 1.90}
    assert set(G.ROUND1) == set(neff)
    for arm in G.ROUND1:
        for s in G.SELECTION_SEEDS:
            _write(tmp_path, "w", arm, s, _run(s, neff[arm], loss[arm]))
    # bias+aux has the lowest loss but misses 6.4 on its worst layer; bias is the cheapest that reaches it
    assert G.select_r1(tmp_path, "w") == "chrono-pi-bias"
    for s in G.SELECTION_SEEDS:                                # nobody reaches 6.4: highest worst layer
        for arm in G.ROUND1:
            _write(tmp_path, "w", arm, s, _run(s, [x - 3 for x in neff[arm]], loss[arm]))
    assert G.select_r1(tmp_path, "w") == "chrono-pi-aux-t0.9"


def _fill_round2(cache, ref_losses, cand):
    """Reference runs with ``ref_losses`` (one per selection seed) and every candidate at
    (worst-layer Neff, per-seed losses) from ``cand`` (default: far worse loss, Neff 7.9)."""
    for s, l in zip(G.SELECTION_SEEDS, ref_losses):
        _write(cache, "w", G.REFERENCE, s, _run(s, [7.0, 7.0], l))
    for arm in G.CANDIDATES:
        worst, losses = cand.get(arm, (7.9, [3.0, 3.0, 3.0]))
        for s, l in zip(G.SELECTION_SEEDS, losses):
            _write(cache, "w", arm, s, _run(s, [worst, 8.0], l))


def test_round2_rule_highest_worst_layer_among_those_within_one_se_of_the_reference(tmp_path):
    assert len(G.ROUND2) == 7 and set(G.ROUND1) < set(G.CANDIDATES)
    for arm in G.CANDIDATES:                                   # candidates without the reference: wait
        for s in G.SELECTION_SEEDS:
            _write(tmp_path, "w", arm, s, _run(s, [7.0, 7.0], 1.8))
    assert G.select(tmp_path, "w") is None
    # reference losses 1.79/1.80/1.81: mean 1.80, sem 0.00577
    a, b, c = "chrono-pi-aux-p2", "chrono-pi-aux-b0.1", "chrono-pi-bias"
    # a: mean 1.806, sem 0.00115 -> gap 0.006 <= sqrt(0.00577² + 0.00115²) = 0.00589? no: 0.006 > 0.00589
    # b: mean 1.805, sem 0.00289 -> gap 0.005 <= 0.00645: eligible; c: 1.70, eligible, lower Neff
    _fill_round2(tmp_path, [1.79, 1.80, 1.81],
                 {a: (7.6, [1.804, 1.806, 1.808]), b: (7.2, [1.800, 1.805, 1.810]), c: (6.0, [1.70] * 3)})
    assert G.select(tmp_path, "w") == b                        # a has more Neff but is just outside 1 SE
    _fill_round2(tmp_path, [1.79, 1.80, 1.81],
                 {a: (7.6, [1.803, 1.805, 1.807]), b: (7.2, [1.800, 1.805, 1.810]), c: (6.0, [1.70] * 3)})
    assert G.select(tmp_path, "w") == a                        # gap 0.005 <= 0.00589: now eligible, highest
    _fill_round2(tmp_path, [1.50, 1.50, 1.50], {c: (6.0, [1.70] * 3)})
    assert G.select(tmp_path, "w") == c                        # nobody eligible: the lowest loss


def test_round2_reuses_round1_heldout_runs_when_it_chooses_the_same_arm(tmp_path):
    _fill_round2(tmp_path, [1.80] * 3, {"chrono-pi-bias": (7.5, [1.80] * 3)})
    assert G.select(tmp_path, "w") == "chrono-pi-bias" == G.select_r1(tmp_path, "w")
    assert G.chrono_dir(tmp_path, "w") == "chrono"
    assert G.spec_of(tmp_path, "w", "chrono-r2") == ("chrono-pi-bias", {"reuse": "chrono"})
    _fill_round2(tmp_path, [1.80] * 3, {"chrono-pi-aux-p2-b0.1": (7.5, [1.80] * 3)})
    assert G.chrono_dir(tmp_path, "w") == "chrono-r2"
    name, spec = G.spec_of(tmp_path, "w", "chrono-r2")
    assert name == "chrono-pi-aux-p2-b0.1" and spec["control_every"] == 2
    assert spec["config"]["integral_init"] == G.I0_ALPHA_01
    assert 0.003 + (0.3 - 0.003) * G.I0_ALPHA_01 == pytest.approx(0.1, abs=1e-4)


def test_domination_needs_both_axes_beyond_one_standard_error():
    c = {"final_neff_worst_layer": 6.0, "final_neff_worst_layer_sem": 0.1, "final_neff_mean": 6.5,
         "final_neff_sem": 0.1, "val_loss_mean": 1.80, "val_loss_sem": 0.01}
    b = dict(c, final_neff_worst_layer=6.5, final_neff_mean=7.0, val_loss_mean=1.77)
    assert R.dominates(b, c)
    assert not R.dominates(dict(b, val_loss_mean=1.79), c)      # loss gap 0.01 < sqrt(2)·0.01
    assert not R.dominates(dict(b, final_neff_worst_layer=6.1), c)
    assert not R.dominates(c, b)


def test_summarise_sem_and_worst_layer():
    rs = [_run(3, [6.0, 7.0], 1.0), _run(4, [5.0, 8.0], 1.2, confirmed=40)]
    r = R.summarise(rs, "w", "a", "aux", {}, "heldout", (3, 4, 5))
    assert r["final_neff_mean"] == pytest.approx(6.5) and r["final_neff_worst_layer"] == pytest.approx(5.5)
    assert r["final_neff_worst_layer_min"] == 5.0 and r["collapse_confirmed_runs"] == 1
    assert r["val_loss_sem"] == pytest.approx(0.1)            # std(ddof=1)=0.1414 / sqrt(2)
    assert r["complete"] is False and r["seeds_missing"] == [5]


@pytest.mark.slow
@pytest.mark.parametrize("workload,arms", [("byte-moe", ("aux0.1", "chrono-pi-aux-p2-b0.1")),
                                           ("qwen3-moe", ("bias0.08", "chrono-pi-bias+aux"))])
def test_arm_families_train_a_few_steps(workload, arms):
    wl = replace(W.workloads(quick=True)[workload], steps=10, batch=4, eval_batches=1)
    train, val = W.load_text()
    for arm in arms:
        spec = G.BASELINES.get(arm) or G.CANDIDATES[arm]
        rec = W.train_arm(wl, spec, 0, 5, train, val, arm=arm)
        assert len(rec["final_neff"]) == 2 and all(1.0 <= n <= 8.0 for n in rec["final_neff"])
        assert rec["val_loss"] > 0 and len(rec["curve"]) == 2
        assert (rec["mean_effort"] is not None) == ("govern" in spec)


def test_short_control_period_decides_every_period_and_keeps_alert_windows(monkeypatch):
    """control_every=2: the controller sees 2-step windows (5 per 10 steps) while the curve and
    the alerts keep 5-step windows; the preset alpha applies from the first step."""
    wl = replace(W.workloads(quick=True)["byte-moe"], steps=10, batch=2, eval_batches=1)
    train, val = W.load_text()
    seen = []
    real = W.Governor.observe

    def spy(self, step, rows):
        seen.append((step, rows[0]["window_start"], [self.aux_weight(l) for l in (0, 1)]))
        return real(self, step, rows)
    monkeypatch.setattr(W.Governor, "observe", spy)
    rec = W.train_arm(wl, G.CANDIDATES["chrono-pi-aux-p2-b0.1"], 0, 5, train, val, arm="x")
    assert [(s, w) for s, w, _ in seen] == [(1, 0), (3, 2), (5, 4), (7, 6), (9, 8)]
    assert len(rec["curve"]) == 2 and len(rec["curve"][0]) == 4   # curve: 5-step windows
    assert seen[0][2] == pytest.approx([0.1, 0.1], abs=1e-4)   # alpha before the first decision
