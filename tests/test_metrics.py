"""Metric semantics of DESIGN §4 (ChronoMoE) and the merge property."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from chrono import metrics as M


def test_uniform_counts():
    m = M.summarize([5, 5, 5, 5])
    assert m.token_count == 20
    assert m.entropy == pytest.approx(math.log(4))
    assert m.neff == pytest.approx(4.0)
    assert m.top2_share == pytest.approx(0.5)
    assert (m.dead, m.nearly_dead) == (0, 0)
    assert m.cv == pytest.approx(0.0)
    assert m.max_violation == pytest.approx(0.0)
    assert m.gini == pytest.approx(0.0)
    assert m.jain == pytest.approx(1.0)


def test_two_of_four_experts():
    m = M.summarize([50, 50, 0, 0])
    assert m.neff == pytest.approx(2.0)
    assert m.top2_share == pytest.approx(1.0)
    assert m.dead == 2
    assert m.max_violation == pytest.approx(1.0)  # max 50 / mean 25 - 1
    assert m.jain == pytest.approx(0.5)


def test_one_expert_takes_all():
    m = M.summarize([0, 0, 9, 0])
    assert m.neff == pytest.approx(1.0)
    assert m.entropy == 0.0
    assert m.top2_share == pytest.approx(1.0)
    assert m.dead == 3
    assert m.gini == pytest.approx(0.75)  # (n-1)/n


def test_zero_traffic_window():
    m = M.summarize([0, 0, 0, 0, 0])
    assert m.token_count == 0
    assert m.dead == 5
    assert m.neff == 1.0
    assert m.top2_share == 0.0
    assert m.entropy == 0.0
    assert (m.cv, m.max_violation, m.gini, m.jain) == (0.0, 0.0, 0.0, 1.0)


def test_top2_single_expert_is_one():
    assert M.top2_share([7]) == 1.0


def test_dead_is_strict_and_nearly_dead_below_one_percent():
    # shares: 0.995, 0.005, 0 -> one nearly dead, one dead
    m = M.summarize([995, 5, 0])
    assert m.dead == 1
    assert m.nearly_dead == 1
    # exactly 1 % is not nearly dead
    assert M.nearly_dead([99, 1]) == 0


def test_entropy_ignores_shares_below_epsilon():
    # a share of 1e-11 is ignored, so entropy equals the single-expert value 0
    counts = np.array([1e11, 1.0])
    assert M.entropy(counts) == pytest.approx(0.0, abs=1e-9)


def test_batched_shapes():
    counts = np.array([[[5, 5, 0, 0], [1, 1, 1, 1]], [[0, 0, 0, 0], [4, 0, 0, 0]]])
    m = M.summarize(counts)
    assert m.neff.shape == (2, 2)
    np.testing.assert_allclose(m.neff, [[2, 4], [1, 1]])
    np.testing.assert_array_equal(m.dead, [[2, 0], [4, 3]])


def test_drop_fraction():
    assert M.drop_fraction(25, 75) == pytest.approx(0.25)
    assert M.drop_fraction(0, 0) == 0.0
    m = M.summarize([30, 30, 15], dropped=[5, 10, 10])
    assert m.drop_fraction == pytest.approx(25 / 100)


def test_switch_aux_loss_uniform_and_collapsed():
    rng = np.random.default_rng(0)
    e = 4
    # perfectly balanced: every expert top-1 equally often with uniform probs -> alpha
    logits = np.tile(np.eye(e) * 1e-6, (25, 1))
    assert M.switch_aux_loss(logits, alpha=0.01) == pytest.approx(0.01, rel=1e-4)
    # collapsed onto one expert with confident router -> approaches alpha * E
    logits = np.zeros((100, e))
    logits[:, 0] = 20.0
    assert M.switch_aux_loss(logits, alpha=1.0) == pytest.approx(e, rel=1e-6)
    # random logits lie in between
    val = M.switch_aux_loss(rng.normal(size=(1000, e)), top_k=2)
    assert 1.0 <= val <= e


def test_router_z_loss_matches_definition():
    logits = np.array([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e ** 2)]
    assert M.router_z_loss(logits) == pytest.approx(np.mean(np.square(lse)))


@pytest.mark.parametrize("bad", [[-1, 2], [np.nan, 1], [], 3])
def test_invalid_counts_rejected(bad):
    with pytest.raises(ValueError):
        M.summarize(bad)


count_vectors = st.integers(min_value=1, max_value=16).flatmap(
    lambda n: st.tuples(
        arrays(np.int64, n, elements=st.integers(0, 10_000)),
        arrays(np.int64, n, elements=st.integers(0, 10_000)),
    )
)


@settings(max_examples=300, deadline=None)
@given(count_vectors)
def test_metrics_of_summed_halves_equal_whole_window(halves):
    """A window split into two halves: merge(halves).compute() == metrics of the whole."""
    a, b = halves
    whole = M.summarize(a + b)
    wa, wb = M.RoutingWindow(len(a)), M.RoutingWindow(len(a))
    wa.update(a)
    wb.update(b)
    merged = wa.merge(wb).compute()
    for name, value in whole.as_dict().items():
        assert getattr(merged, name) == pytest.approx(value, rel=1e-12, abs=1e-12), name


@settings(max_examples=200, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 5), st.integers(1, 12)), elements=st.integers(0, 1000)))
def test_batched_equals_row_by_row(counts):
    batched = M.summarize(counts)
    for i, row in enumerate(counts):
        single = M.summarize(row)
        for name, value in single.as_dict().items():
            got = getattr(batched, name)
            got = got[i] if isinstance(got, np.ndarray) else got
            assert got == pytest.approx(value, rel=1e-12, abs=1e-12), name


@settings(max_examples=200, deadline=None)
@given(arrays(np.int64, st.integers(1, 32), elements=st.integers(0, 1000)))
def test_metric_bounds(counts):
    m = M.summarize(counts)
    n = len(counts)
    assert 1.0 - 1e-9 <= m.neff <= n + 1e-9
    assert 0.0 <= m.top2_share <= 1.0 + 1e-12
    assert 0 <= m.dead <= n
    assert 0.0 <= m.gini < 1.0
    assert 1.0 / n - 1e-12 <= m.jain <= 1.0 + 1e-12
