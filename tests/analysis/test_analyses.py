"""Each analysis against numbers computed by hand on tests/analysis/hand_store.py.

The expected values are written out as fractions worked from the table in
hand_store's docstring (comments show the arithmetic); JS divergence is checked
against scipy's independent implementation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import chrono
from chrono.analysis import AnalysisError, Scope, analyze, parse_steps
from tests.analysis.hand_store import AGG_RUN, RUN, TOP1_RUN, build


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand") / "store"
    build(root)
    return chrono.connect(root)


def _rows(result, **match):
    return [r for r in result.table.to_pylist() if all(r[k] == v for k, v in match.items())]


def test_coactivation_lift_by_hand(con):
    res = analyze(con, "coactivation", Scope(RUN, layer=0))
    rows = {(r["expert_a"], r["expert_b"]): r for r in res.table.to_pylist()}
    assert len(rows) == 6  # pairs a < b of 4 experts
    # layer 0: N = 6 tokens; c0 = 4, c1 = 4, c2 = 3, c3 = 1 (12 = 6 x 2 assignments)
    # {0,1}: s0p0, s0p2, s1p1 -> 3; {2,3}: s0p1; {1,2}: s0p3; {0,2}: s1p0
    expect = {(0, 1): (3, 3 * 6 / (4 * 4)), (2, 3): (1, 1 * 6 / (3 * 1)), (1, 2): (1, 6 / 12),
              (0, 2): (1, 6 / 12), (0, 3): (0, 0.0), (1, 3): (0, 0.0)}
    for pair, (both, lift) in expect.items():
        assert rows[pair]["tokens_both"] == both, pair
        assert rows[pair]["lift"] == pytest.approx(lift), pair
        assert rows[pair]["tokens"] == 6
    assert rows[(0, 1)]["tokens_a"] == 4 and rows[(2, 3)]["tokens_b"] == 1
    assert res.summary["0"]["top_pair"] == [2, 3] and res.summary["0"]["lift"] == pytest.approx(2.0)
    assert res.needs == "tokens"


def test_coactivation_matrix_is_symmetric_over_all_layers(con):
    from chrono.analysis.coactivation import coactivation_matrix

    mats = coactivation_matrix(con, Scope(RUN))
    assert sorted(mats) == [0, 1]
    for d in mats.values():
        assert (d["both"] == d["both"].T).all()
        assert d["both"].sum() == 2 * d["tokens"]  # top-2: one pair per token, counted twice
    # layer 1 pairs: {0,1} s0p0, {2,3} s0p1, {1,3} s0p2 + s1p0, {0,2} s0p3, {0,3} s1p1
    b = mats[1]["both"]
    assert (b[0, 1], b[2, 3], b[1, 3], b[0, 2], b[0, 3], b[1, 2]) == (1, 1, 2, 1, 1, 0)


def test_vocabulary_by_hand(con):
    res = analyze(con, "vocabulary", Scope(RUN, layer=0), top=5)
    e0 = _rows(res, expert=0)
    # expert 0 at layer 0 receives ids 10 (s0p0, s0p2, s1p1) and 11 (s1p0): P = {10: 3/4, 11: 1/4}
    assert [(r["rank"], r["token_id"], r["count"]) for r in e0] == [(1, 10, 3), (2, 11, 1)]
    # corpus Q over the layer's 12 assignments: 10 -> 6/12, 11 -> 4/12, 12 -> 2/12
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / (1 / 3))
    assert e0[0]["expert_entropy"] == pytest.approx(h)
    assert e0[0]["expert_kl"] == pytest.approx(kl)
    assert e0[0]["p_token_given_expert"] == pytest.approx(0.75)
    assert e0[0]["lift"] == pytest.approx(0.75 / 0.5)
    # id 10 occurs 3 times at layer 0 (its slot-0 rows) and expert 0 is among the choices each time
    assert e0[0]["p_expert_given_token"] == pytest.approx(1.0)
    assert e0[1]["p_expert_given_token"] == pytest.approx(1 / 2)  # id 11 occurs twice, once to e0
    e3 = _rows(res, expert=3)  # only id 11: entropy 0, KL = ln(1 / (1/3))
    assert e3[0]["expert_entropy"] == pytest.approx(0.0)
    assert e3[0]["expert_kl"] == pytest.approx(math.log(3))
    s = res.summary["0"]
    assert s["most_specialized_expert"] == 3 and s["distinct_tokens"] == 3
    assert s["corpus_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3)
                                                  + (1 / 6) * math.log(1 / 6)))


def test_vocabulary_top_limits_rows(con):
    res = analyze(con, "vocabulary", Scope(RUN), top=1)
    assert res.table.num_rows == 8  # 2 layers x 4 experts, one row each
    assert set(res.table.column("rank").to_pylist()) == {1}


def test_transitions_by_hand(con):
    res = analyze(con, "transitions", Scope(RUN))
    got = {(r["expert"], r["next_expert"]): r for r in res.table.to_pylist()}
    # top-1 pairs L0 -> L1: 0->1 (s0p0), 2->3 (s0p1), 0->1 (s0p2), 1->0 (s0p3), 2->3 (s1p0), 0->3 (s1p1)
    assert {k: r["count"] for k, r in got.items()} == {(0, 1): 2, (2, 3): 2, (1, 0): 1, (0, 3): 1}
    assert got[(0, 1)]["p"] == pytest.approx(2 / 3) and got[(0, 3)]["p"] == pytest.approx(1 / 3)
    # P(next = 1) = 2/6, P(next = 3) = 3/6, P(next = 0) = 1/6
    assert got[(0, 1)]["lift"] == pytest.approx((2 / 3) / (2 / 6))
    assert got[(0, 3)]["lift"] == pytest.approx((1 / 3) / (3 / 6))
    assert got[(1, 0)]["lift"] == pytest.approx(1 / (1 / 6))
    mi = (2 / 6) * math.log(2) + (1 / 6) * math.log(2 / 3) + (2 / 6) * math.log(2) + (1 / 6) * math.log(6)
    h_next = -((2 / 6) * math.log(2 / 6) + (3 / 6) * math.log(3 / 6) + (1 / 6) * math.log(1 / 6))
    s = res.summary["0"]
    assert s["matched_tokens"] == 6 and s["matched_share"] == pytest.approx(1.0)
    assert s["mutual_information"] == pytest.approx(mi)
    assert s["normalized_mi"] == pytest.approx(mi / h_next)
    assert all(r["layer"] == 0 and r["next_layer"] == 1 for r in got.values())


def test_loads_by_hand(con):
    res = analyze(con, "loads", Scope(RUN))
    l0, l1 = res.table.to_pylist()
    # layer 0 totals over steps 0..3: [8, 6, 10, 8]; sorted [6, 8, 8, 10], mean 8
    assert (l0["min"], l0["p50"], l0["max"], l0["mean"]) == (6, 8, 10, 8)
    assert l0["p90"] == pytest.approx(8 + 0.7 * 2)  # rank 0.9 x 3 = 2.7 between 8 and 10
    assert l0["p99"] == pytest.approx(8 + 0.97 * 2)
    assert l0["std"] == pytest.approx(math.sqrt((0 + 4 + 4 + 0) / 4))
    assert l0["cv"] == pytest.approx(math.sqrt(2) / 8)
    assert l0["max_violation"] == pytest.approx(10 / 8 - 1)
    assert l0["tokens"] == 32 and l0["experts"] == 4
    assert l1["max_violation"] == 0 and l1["std"] == 0
    s = res.summary
    assert s["max_violation_across_layers"] == pytest.approx({"p50": 0.125, "p90": 0.225, "p99": 0.2475,
                                                               "max": 0.25})
    # per step, layer 0: max/mean - 1 = 4/2-1, 3/2-1, 4/2-1, 3/2-1; layer 1: 0 x 4
    # sorted [0, 0, 0, 0, .5, .5, 1, 1]: p50 at rank 3.5 -> 0.25, p90 at rank 6.3 -> 1
    assert s["max_violation_across_steps"] == pytest.approx({"p50": 0.25, "p90": 1.0, "p99": 1.0, "max": 1.0})
    assert s["step_layer_pairs"] == 8


def test_loads_step_range_is_half_open(con):
    res = analyze(con, "loads", Scope(RUN, steps=(2, 4), layer=0))
    (row,) = res.table.to_pylist()
    assert row["tokens"] == 16 and row["min"] == 1 and row["max"] == 7  # [1, 1, 7, 7]


def test_drift_js_against_scipy_and_top1_by_hand(con):
    from scipy.spatial.distance import jensenshannon

    res = analyze(con, "drift", Scope(RUN, steps=(0, 1)), against=(1, 2), min_count=1)
    rows = {r["layer"]: r for r in res.table.to_pylist()}
    assert rows[0]["js"] == pytest.approx(jensenshannon([4, 2, 2, 0], [3, 3, 1, 1], base=2) ** 2)
    assert rows[1]["js"] == pytest.approx(0.0)
    # modal top-1 per id, layer 0: step 0 {10: 0, 11: 2, 12: 1}, step 1 {11: 2, 10: 0} -> none changed
    assert rows[0]["top1_tokens"] == 2 and rows[0]["top1_changed"] == 0
    # layer 1: step 0 {10: 1, 11: 3, 12: 0}, step 1 {11: 3, 10: 3} -> id 10 changed
    assert rows[1]["top1_changed"] == pytest.approx(0.5)
    # weighted by occurrences in both ranges: id 10 2 + 1 (changed), id 11 1 + 1
    assert rows[1]["top1_changed_weighted"] == pytest.approx(3 / 5)


def test_drift_series_windows_against_last(con):
    res = analyze(con, "drift", Scope(RUN, layer=0), n_windows=4)
    from scipy.spatial.distance import jensenshannon

    rows = res.table.to_pylist()
    assert [(r["start"], r["stop"], r["ref_start"]) for r in rows] == [(0, 1, 3), (1, 2, 3), (2, 3, 3)]
    ref = [1, 1, 3, 3]
    for r, p in zip(rows, [[4, 2, 2, 0], [3, 3, 1, 1], [0, 0, 4, 4]]):
        assert r["js"] == pytest.approx(jensenshannon(p, ref, base=2) ** 2)
    # no token ids in steps 3 (the reference window): top-1 columns are empty, and a note says why
    assert all(r["top1_changed"] is None for r in rows) and res.notes


def test_min_count_filters_rare_tokens(con):
    res = analyze(con, "drift", Scope(RUN, steps=(0, 1)), against=(1, 2), min_count=2)
    rows = {r["layer"]: r for r in res.table.to_pylist()}
    assert rows[1]["top1_tokens"] is None  # no id occurs twice in step 1


@pytest.mark.parametrize("kind", ["coactivation", "vocabulary", "transitions"])
def test_token_analyses_say_tokens_are_missing(con, kind):
    with pytest.raises(AnalysisError, match=r"tokens=") as e:
        analyze(con, kind, Scope(AGG_RUN))
    assert "per-token rows" in str(e.value)


def test_missing_in_range_names_the_range(con):
    with pytest.raises(AnalysisError, match=r"steps 2:4 .*12 rows outside it|outside it"):
        analyze(con, "coactivation", Scope(RUN, steps=(2, 4)))


def test_aggregate_only_run_still_has_loads_and_js(con):
    assert analyze(con, "loads", Scope(AGG_RUN)).table.num_rows == 2
    d = analyze(con, "drift", Scope(AGG_RUN), n_windows=2)
    assert d.table.column("js").null_count == 0 and d.table.column("top1_changed").null_count == 2


def test_top1_only_run_refuses_coactivation_and_transitions(con):
    with pytest.raises(AnalysisError, match="top-k > 1"):
        analyze(con, "coactivation", Scope(TOP1_RUN))
    with pytest.raises(AnalysisError, match="two or more layers"):
        analyze(con, "transitions", Scope(TOP1_RUN))


def test_transitions_without_shared_tokens_explains_sampling(tmp_path):
    root = tmp_path / "s"
    with chrono.open_run(root, "r") as w:
        w.log_tokens(0, 0, [1], position=0, k=0)
        w.log_tokens(0, 1, [2], position=5, k=0)  # a different token sampled at layer 1
    with pytest.raises(AnalysisError, match="same tokens"):
        analyze(chrono.connect(root), "transitions", Scope("r"))


@pytest.mark.parametrize("text,expect", [("0:10", (0, 10)), ("5:", (5, None)), (":7", (None, 7)),
                                         ("", (None, None)), (None, (None, None)), ("3", (3, 4))])
def test_parse_steps(text, expect):
    assert parse_steps(text) == expect


@pytest.mark.parametrize("bad", ["a:b", "5:5", "9:2", "1:2:3"])
def test_parse_steps_rejects(bad):
    with pytest.raises(AnalysisError):
        parse_steps(bad)


def test_unknown_kind_and_mode(con):
    with pytest.raises(AnalysisError, match="kinds: coactivation"):
        analyze(con, "nope", Scope(RUN))
    with pytest.raises(AnalysisError, match="modes are"):
        Scope(RUN, mode="TRAINING")


def test_mode_filter(con):
    with pytest.raises(AnalysisError):
        analyze(con, "loads", Scope(RUN, mode="EVAL"))
    assert analyze(con, "loads", Scope(RUN, mode="TRAIN")).table.num_rows == 2


def _random_token_store(root, n_experts, shuffle, seed=0):
    """200 tokens x 3 layers, top-3, written in token blocks or shuffled; returns the true pair counts."""
    rng = np.random.default_rng(seed)
    truth = {}
    rows = []
    for layer in range(3):
        both = np.zeros((n_experts, n_experts), dtype=np.int64)
        for t in range(200):
            ex = rng.choice(n_experts, 3, replace=False)
            for a in range(3):
                for b in range(3):
                    if a != b:
                        both[ex[a], ex[b]] += 1
                rows.append((t // 50, layer, t % 50, a, int(ex[a])))
        truth[layer] = both
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    with chrono.open_run(root, "rand", model={"experts_per_layer": {str(l): n_experts for l in range(3)}}) as w:
        arr = np.array(rows)
        w.log_tokens(arr[:, 0], arr[:, 1], arr[:, 4], batch_idx=0, position=arr[:, 2], k=arr[:, 3])
    return truth


@pytest.mark.parametrize("n_experts,shuffle", [(8, False), (8, True), (80, True), (80, False)])
def test_coactivation_paths_agree_with_counted_truth(tmp_path, n_experts, shuffle):
    """Block fast path (in-order rows), SQL bit masks (<= 64 experts) and SQL self-join (wider)."""
    from chrono.analysis.coactivation import coactivation_matrix

    truth = _random_token_store(tmp_path / "s", n_experts, shuffle)
    con = chrono.connect(tmp_path / "s")
    for fast in (True, False):
        mats = coactivation_matrix(con, Scope("rand"), fast=fast)
        for layer, both in truth.items():
            assert (mats[layer]["both"] == both).all(), (layer, fast)
            assert mats[layer]["tokens"] == 200
            assert (mats[layer]["marginal"] == both.sum(1) // 2).all()


def test_transitions_with_shuffled_rows_match_in_order(tmp_path):
    _random_token_store(tmp_path / "a", 8, shuffle=False, seed=3)
    _random_token_store(tmp_path / "b", 8, shuffle=True, seed=3)
    ta = analyze(chrono.connect(tmp_path / "a"), "transitions", Scope("rand")).table
    tb = analyze(chrono.connect(tmp_path / "b"), "transitions", Scope("rand")).table
    assert ta.to_pylist() == tb.to_pylist() and ta.num_rows > 0


def test_vocabulary_sparse_path_equals_dense(con, monkeypatch):
    import importlib

    voc = importlib.import_module("chrono.analysis.vocabulary")

    dense = analyze(con, "vocabulary", Scope(RUN), top=3)
    monkeypatch.setattr(voc, "DENSE_LIMIT", 1)  # force np.unique over the (layer, expert, token) index
    sparse = analyze(con, "vocabulary", Scope(RUN), top=3)
    assert dense.table.to_pylist() == sparse.table.to_pylist() and dense.summary == sparse.summary


def test_loads_per_step_sql_path_equals_dense(con, monkeypatch):
    import importlib

    loads_mod = importlib.import_module("chrono.analysis.loads")
    dense = analyze(con, "loads", Scope(RUN)).summary
    monkeypatch.setattr(loads_mod, "DENSE_LIMIT", 1)
    sql = analyze(con, "loads", Scope(RUN)).summary
    assert sql["step_layer_pairs"] == dense["step_layer_pairs"] == 8
    assert sql["max_violation_across_steps"] == pytest.approx(dense["max_violation_across_steps"])


def test_loads_sums_ranks_of_one_step_before_the_max(tmp_path):
    for rank, counts in ((0, [3, 1]), (1, [0, 4])):  # two ranks write the same step
        with chrono.open_run(tmp_path / "s", "r", model={"experts_per_layer": {"0": 2}}, rank=rank,
                             world_size=2) as w:
            w.log_routing(0, 0, np.array(counts))
    s = analyze(chrono.connect(tmp_path / "s"), "loads", Scope("r")).summary
    # summed [3, 5]: max 5 / mean 4 - 1 (not max of a single rank's row)
    assert s["max_violation_across_steps"]["max"] == pytest.approx(0.25)


def _older_manifest(root, run, model):
    """Give the run a manifest that undercounts its experts, as a store written before the write
    API checked rows against the manifest (issue 23) can have: today's writer refuses such rows."""
    import json

    from chrono.store import run_dir

    path = run_dir(root, run) / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(manifest, model=model)))


def test_manifest_that_undercounts_experts_is_overridden_by_the_rows(tmp_path):
    with chrono.open_run(tmp_path / "s", "r") as w:
        w.log_routing(0, 0, np.array([1, 1, 6]))  # 3 experts recorded, the manifest says 2
        w.log_routing(1, 0, np.array([2, 2, 4]))
    _older_manifest(tmp_path / "s", "r", {"experts_per_layer": {"0": 2}})
    con = chrono.connect(tmp_path / "s")
    (row,) = analyze(con, "loads", Scope("r")).table.to_pylist()
    assert row["experts"] == 3 and row["max"] == 10
    assert analyze(con, "drift", Scope("r"), n_windows=2).table.num_rows == 1


def test_coactivation_sql_path_with_wide_rows_and_a_small_manifest(tmp_path):
    """70 experts recorded, a manifest that claims 8: the self-join path, not 64-bit masks."""
    from chrono.analysis.coactivation import coactivation_matrix

    with chrono.open_run(tmp_path / "s", "r") as w:
        w.log_tokens(0, 0, [69, 3, 65, 3], position=[1, 1, 0, 0], k=[0, 1, 0, 1])  # adjacent blocks
        w.log_tokens(1, 0, [3, 69], position=[0, 0], k=[1, 0])  # slots out of order: no fast path
    _older_manifest(tmp_path / "s", "r", {"experts_per_layer": {"0": 8}})
    mats = coactivation_matrix(chrono.connect(tmp_path / "s"), Scope("r"))
    both = mats[0]["both"]
    assert both.shape == (70, 70) and both[3, 69] == 2 and both[3, 65] == 1 and both.sum() == 6
