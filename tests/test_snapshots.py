"""Snapshots over windows and the alert persistence rules (DESIGN §4)."""
import numpy as np
import pyarrow as pa
import pytest

from chrono.snapshots import AlertTracker, alerts_for, build_snapshots, layer_rows, window_bounds

HEALTHY = [25, 25, 25, 25]
PRE_ONLY = [70, 10, 10, 10]  # Top2 0.8 > 0.75, no dead expert
COLLAPSED = [90, 10, 0, 0]   # dead >= 1 and Top2 1.0 > 0.85 (and PRE condition too)


def feed(seq, layer=0):
    """Run the tracker over windows with the given per-window counts; return (window index, transition)."""
    tr = AlertTracker()
    out = []
    for i, counts in enumerate(seq):
        rows = layer_rows("r", i * 10, i * 10 + 9, {layer: np.array(counts)}) if counts is not None else []
        for t in tr.update(rows):
            out.append((i, t["alert"], t["transition"]))
    return out


def test_pre_collapse_fires_at_third_consecutive_snapshot():
    assert feed([PRE_ONLY, PRE_ONLY]) == []
    assert feed([PRE_ONLY] * 3) == [(2, "PRE_COLLAPSE", "raised")]


def test_confirmed_fires_at_fifth_and_pre_first():
    events = feed([COLLAPSED] * 6)
    assert events == [(2, "PRE_COLLAPSE", "raised"), (4, "COLLAPSE_CONFIRMED", "raised")]


def test_counter_resets_when_condition_false():
    # two bad, one healthy, two bad: never three consecutive
    assert feed([PRE_ONLY, PRE_ONLY, HEALTHY, PRE_ONLY, PRE_ONLY]) == []


def test_cleared_when_condition_stops():
    events = feed([PRE_ONLY] * 3 + [HEALTHY])
    assert events == [(2, "PRE_COLLAPSE", "raised"), (3, "PRE_COLLAPSE", "cleared")]


def test_raised_once_while_condition_holds():
    events = feed([PRE_ONLY] * 10)
    assert events == [(2, "PRE_COLLAPSE", "raised")]


def test_neff_condition_alone_triggers_pre_collapse():
    # n = 8, traffic spread evenly over 4 experts: Neff 4 < 0.6*8 = 4.8, Top2 only 0.5
    spread = [10, 10, 10, 10, 0, 0, 0, 0]
    assert feed([spread] * 3) == [(2, "PRE_COLLAPSE", "raised")]


def test_idle_window_resets_counters_and_raises_nothing():
    zero = [0, 0, 0, 0]
    assert feed([zero] * 6) == []  # zero traffic is idle, not collapse
    assert feed([PRE_ONLY, PRE_ONLY, zero, PRE_ONLY, PRE_ONLY]) == []
    # a missing layer (no rows) also breaks the run of consecutive snapshots
    assert feed([PRE_ONLY, PRE_ONLY, None, PRE_ONLY, PRE_ONLY]) == []


def test_layers_are_tracked_independently():
    tr = AlertTracker()
    got = []
    for i in range(3):
        rows = layer_rows("r", 0, 9, {0: np.array(PRE_ONLY), 1: np.array(HEALTHY)})
        got += [(t["layer"], t["alert"]) for t in tr.update(rows)]
    assert got == [(0, "PRE_COLLAPSE")]
    assert tr.active() == {0: {"PRE_COLLAPSE"}}


def test_transition_carries_triggering_values():
    tr = AlertTracker()
    for _ in range(3):
        out = tr.update(layer_rows("r", 0, 9, {3: np.array(PRE_ONLY)}))
    (t,) = out
    assert t["layer"] == 3 and t["consecutive"] == 3
    assert t["top2_share"] == pytest.approx(0.8)
    assert t["n_experts"] == 4 and t["dead"] == 0


def test_global_row_sums_and_means():
    rows = layer_rows("r", 0, 9, {0: np.array([50, 50, 0, 0]), 1: np.array([0, 0, 0, 0])})
    g = rows[-1]
    assert g["layer"] == -1
    assert g["token_count"] == 100
    assert g["n_experts"] == 8
    assert g["dead"] == 2 + 4
    assert g["neff"] == pytest.approx(2.0)  # mean over layers with traffic only


def test_window_bounds():
    assert window_bounds(0, 10) == (0, 9)
    assert window_bounds(25, 10) == (20, 29)
    with pytest.raises(ValueError):
        window_bounds(3, 0)


def _routing(rows):
    step, layer, expert, tokens = zip(*rows)
    return pa.table({"step": list(step), "layer": list(layer), "expert": list(expert), "tokens": list(tokens)})


def test_build_snapshots_matches_layer_rows():
    rng = np.random.default_rng(1)
    rows = []
    counts = {}
    for step in range(20):
        for layer in (0, 1):
            c = rng.integers(0, 50, size=4)
            for e in range(4):
                rows.append((step, layer, e, int(c[e])))
            key = (step // 5, layer)
            counts[key] = counts.get(key, 0) + c
    snaps = build_snapshots("r", _routing(rows), every=5).to_pylist()
    assert len(snaps) == 4 * 3  # 4 windows x (2 layers + global)
    for s in snaps:
        if s["layer"] < 0:
            continue
        (expected,) = [r for r in layer_rows("r", 0, 0, {s["layer"]: counts[(s["window_start"] // 5, s["layer"])]})
                       if r["layer"] == s["layer"]]
        for k in ("token_count", "neff", "top2_share", "dead", "gini"):
            assert s[k] == pytest.approx(expected[k]), k
        assert s["step"] == s["window_end"] == s["window_start"] + 4


def test_build_snapshots_expert_count_from_largest_index():
    # expert 3 of layer 0 never shows up in rows of window 0, but is known from window 1
    t = _routing([(0, 0, 0, 10), (5, 0, 3, 10)])
    snaps = [s for s in build_snapshots("r", t, every=5).to_pylist() if s["layer"] == 0]
    assert [s["n_experts"] for s in snaps] == [4, 4]
    assert [s["dead"] for s in snaps] == [3, 3]


def test_alerts_for_replays_stored_snapshots():
    rows = []
    for step in range(60):
        for e, c in enumerate(COLLAPSED):
            rows.append((step, 0, e, c))
    snaps = build_snapshots("r", _routing(rows), every=10)
    alerts = alerts_for(snaps).to_pylist()
    assert [(a["step"], a["alert"], a["transition"]) for a in alerts] == [
        (29, "PRE_COLLAPSE", "raised"), (49, "COLLAPSE_CONFIRMED", "raised")]


def test_single_expert_layer_never_alerts():
    """n = 1: Top2 = 1.0 and Neff = 1 by definition, but one expert cannot be imbalanced."""
    assert feed([[500]] * 8) == []
    # the same layer after growing to 4 experts and collapsing does alert
    assert feed([[500]] * 4 + [COLLAPSED] * 3) == [(6, "PRE_COLLAPSE", "raised")]
    # a layer that shrinks to one expert while an alert is active gets it cleared
    assert feed([PRE_ONLY] * 3 + [[500]]) == [(2, "PRE_COLLAPSE", "raised"), (3, "PRE_COLLAPSE", "cleared")]
    # the single-expert rows really meet the raw thresholds (so the guard is what stops them)
    row = layer_rows("r", 0, 9, {0: np.array([500])})[0]
    assert row["top2_share"] == 1.0 and row["neff"] == 1.0 and row["n_experts"] == 1


def test_two_expert_layer_still_alerts():
    assert feed([[95, 5]] * 3) == [(2, "PRE_COLLAPSE", "raised")]


def test_tracker_from_stored_transitions_matches_the_live_one(store_root):
    """Active alerts restored from transitions (shuffled, repeated as ranks do) = the live tracker's,
    and = what chrono.health's SQL reads from the same rows in a store."""
    import chrono
    from chrono.health import run_health

    rng = np.random.default_rng(7)
    live, seen = AlertTracker(), []
    with chrono.open_run(store_root, "r") as w:
        for win in range(60):
            counts = {l: rng.multinomial(400, rng.dirichlet(np.ones(4) * (0.05 if (win // 8 + l) % 2 else 5)))
                      for l in range(3)}
            if win % 13 == 5:
                counts[2] = np.zeros(4, int)   # idle window clears
            t = live.update(layer_rows("r", win * 5, win * 5 + 4, counts))
            seen.extend(t)
            w.log_rows("alerts", t)
            shuffled = [seen[i] for i in rng.permutation(len(seen))] + seen[: len(seen) // 2]
            assert AlertTracker.from_transitions(shuffled).active() == live.active()
    kinds = {t["transition"] for t in seen}
    assert kinds == {"raised", "cleared"} and live.active()   # the data exercises both ways
    health = run_health(chrono.connect(store_root), "r")["r"]
    assert set(health.active) == {(l, a) for l, s in live.active().items() for a in s}
    tuples = [(t["step"], t["layer"], t["alert"], t["transition"]) for t in seen]
    assert AlertTracker.from_transitions(tuples).active() == live.active()


def test_layer_rows_batched_by_width_equal_one_summary_per_layer():
    """``layer_rows`` summarises layers of one expert count in a single batched call; every
    value must equal the per-layer ``metrics.summarize`` (mixed widths, drops on some layers
    only, an idle layer, a collapsed one)."""
    from chrono import metrics as M
    from chrono.snapshots import GLOBAL_LAYER, _row

    rng = np.random.default_rng(3)
    counts = {0: rng.integers(0, 50, 8), 1: np.zeros(8, np.int64), 2: rng.integers(0, 9, 5),
              3: np.array([0, 0, 400, 0, 0, 0, 0, 0]), 5: rng.integers(0, 1000, 8)}
    dropped = {2: rng.integers(0, 3, 5), 5: rng.integers(0, 7, 8)}
    got = layer_rows("r", 10, 19, counts, dropped)
    want = [_row("r", 10, 19, layer, M.summarize(counts[layer], dropped.get(layer)))
            for layer in sorted(counts)]
    assert got[:-1] == want   # exact, NaN-free rows: == compares every float bit for bit
    assert got[-1]["layer"] == GLOBAL_LAYER
