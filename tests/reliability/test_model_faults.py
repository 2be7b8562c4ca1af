"""Bad model input under probes: NaN/Inf logits, out-of-range indices, wrong shapes,
zero-token batches, no routers, expert count changes. Training never crashes and its
losses are exactly those of the same run without probes; faults are flagged (signal
rows, stats, one log line) or refused with a clear error at attach time."""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import pytest
import torch

import chrono

probes = pytest.importorskip("probes")

_spec = importlib.util.spec_from_file_location("chrono_reliability_moe_tiny",
                                               Path(__file__).with_name("moe_tiny.py"))
moe_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(moe_tiny)

STEPS, BATCH, K, EVERY = 10, 8, 2, 4


def _run(root, fault, layer=0, with_probes=True, steps=STEPS, batch=BATCH, change=None):
    torch.manual_seed(0)
    model = moe_tiny.TinyMoE()
    model.routers[layer].fault = fault

    def on_step(s):
        if change:
            change(model, s)

    if not with_probes:
        return moe_tiny.train_steps(model, steps, batch=batch, on_step=on_step), None
    with probes.attach(model, run="r", root=root, flush_every=EVERY) as h:
        losses = moe_tiny.train_steps(model, steps, batch=batch, on_step=on_step)
    return losses, h


def _signals(root):
    con = chrono.connect(root)
    return dict(((n, l), v) for n, l, v in con.sql(
        "SELECT name, layer, sum(value) FROM signals GROUP BY ALL").fetchall())


def _tokens_per_layer(root):
    return dict(chrono.connect(root).sql("SELECT layer, sum(tokens) FROM routing GROUP BY layer").fetchall())


FLAGGED = {  # fault -> (stats key, signal name or None, tokens counted on the faulty layer)
    "nan_logits": ("nonfinite", "probes.nonfinite", STEPS * BATCH * K),
    "inf_logits": ("nonfinite", "probes.nonfinite", STEPS * BATCH * K),
    "nan_weights": ("nonfinite", "probes.nonfinite", STEPS * BATCH * K),
    "index_too_large": ("invalid_indices", "probes.invalid_expert_index", 0),
    "index_negative": ("invalid_indices", "probes.invalid_expert_index", 0),
    "wrong_shapes": ("faults", None, None),
    "not_a_tuple": ("faults", None, 0),
}


@pytest.mark.parametrize("fault", sorted(FLAGGED))
def test_bad_router_output_is_flagged_and_training_unchanged(tmp_path, caplog, fault):
    caplog.set_level(logging.WARNING)
    baseline, _ = _run(tmp_path / "a", fault, with_probes=False)
    losses, h = _run(tmp_path / "b", fault)
    assert losses == baseline and all(math.isfinite(x) for x in losses)  # training untouched
    key, signal, tokens = FLAGGED[fault]
    st = h.stats()
    assert st[key] > 0, st
    assert st["write_errors"] == 0
    per_layer = _tokens_per_layer(tmp_path / "b")
    assert per_layer[1] == STEPS * BATCH * K  # the healthy layer is recorded in full
    if tokens is not None:
        assert per_layer.get(0, 0) == tokens
    if signal:
        assert _signals(tmp_path / "b")[(signal, 0)] == st[key]  # flagged rows in the store
    # one log line per kind of fault, not one per step
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("probes")]
    assert 1 <= len(msgs) <= 2, msgs


def test_zero_token_batches(tmp_path):
    losses, h = _run(tmp_path, None, batch=0)
    assert all(math.isnan(x) for x in losses)  # mean of nothing: the model's own business
    assert h.stats()["faults"] == 0 and h.stats()["tokens_total"] == {0: 0, 1: 0}
    con = chrono.connect(tmp_path)
    assert con.sql("SELECT count(*) FROM routing").fetchall() == [(0,)]


def test_zero_token_batches_between_normal_ones(tmp_path):
    sizes = iter([8, 0, 8, 0, 0, 8, 8, 0, 8, 8])
    torch.manual_seed(0)
    model = moe_tiny.TinyMoE()
    with probes.attach(model, run="z", root=tmp_path, flush_every=EVERY) as h:
        for s in range(STEPS):
            x = torch.randn(next(sizes), moe_tiny.D)
            model(x).sum().backward()
    assert h.stats()["faults"] == 0
    con = chrono.connect(tmp_path)
    assert con.sql("SELECT layer, sum(tokens) FROM routing WHERE run_id = 'z' GROUP BY layer "
                   "ORDER BY layer").fetchall() == [(0, 6 * 8 * K), (1, 6 * 8 * K)]


def test_model_without_routers_is_refused_at_attach(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for generic in (True, False):
        with pytest.raises(probes.ProbeError, match="no MoE router found"):
            probes.attach(model, run="x", root=tmp_path / "store", generic=generic)
    assert not (tmp_path / "store").exists()  # nothing written
    assert model(torch.randn(2, 4)).shape == (2, 2)  # and no hook left behind
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_expert_count_grows_mid_run(tmp_path):
    def grow(model, s):
        if s == 5:
            model.routers[1].n_experts = 6  # lifecycle spawned two experts mid-window

    baseline, _ = _run(tmp_path / "a", None, with_probes=False, change=grow)
    losses, h = _run(tmp_path / "b", None, change=grow)
    assert losses == baseline
    assert _tokens_per_layer(tmp_path / "b") == {0: STEPS * BATCH * K, 1: STEPS * BATCH * K}
    con = chrono.connect(tmp_path / "b")
    experts = dict(con.sql("SELECT step, count(*) FROM routing WHERE layer = 1 GROUP BY step").fetchall())
    assert experts[STEPS - 1] == 6 and experts[0] == 4


def test_expert_count_shrinks_mid_run_keeps_every_token(tmp_path):
    def shrink(model, s):
        if s == 6:
            model.routers[1].n_experts = 3  # lifecycle pruned an expert mid-window

    losses, h = _run(tmp_path, None, change=shrink)
    assert all(math.isfinite(x) for x in losses)
    assert _tokens_per_layer(tmp_path) == {0: STEPS * BATCH * K, 1: STEPS * BATCH * K}


def test_explicit_steps_are_recorded_at_their_own_step(tmp_path):
    """Regression: the first h.step() used to follow an automatic advance, leaving step 1
    empty and recording every later step one step late."""
    torch.manual_seed(0)
    model = moe_tiny.TinyMoE()
    with probes.attach(model, run="s", root=tmp_path, flush_every=EVERY) as h:
        moe_tiny.train_steps(model, 6, handle=h)
    assert h.stats()["steps"] == 6
    con = chrono.connect(tmp_path)
    assert con.sql("SELECT step, sum(tokens) FROM routing WHERE layer = 0 GROUP BY step ORDER BY step"
                   ).fetchall() == [(s, BATCH * K) for s in range(6)]


def test_storage_fault_under_probes_is_counted_and_recovers(tmp_path, monkeypatch, caplog):
    """Disk full while training with probes: the training loop never sees it, the error is
    counted in h.stats() (what the Prometheus exporter reads) and the rows are written
    once the disk has room again."""
    import errno

    import chrono.store.writer as store

    caplog.set_level(logging.WARNING)
    real = store.pq.write_table
    state = {"full": True}

    def write_table(*a, **k):
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(store.pq, "write_table", write_table)
    baseline, _ = _run(tmp_path / "a", None, with_probes=False)
    torch.manual_seed(0)
    model = moe_tiny.TinyMoE()
    with probes.attach(model, run="r", root=tmp_path / "b", flush_every=EVERY) as h:
        losses = moe_tiny.train_steps(model, STEPS, batch=BATCH)
        h.flush()
        st = h.stats()
        assert st["write_errors"] > 0 and "No space left" in st["last_error"]
        state["full"] = False  # the disk has room again
        h.flush()
    assert losses == baseline
    assert _tokens_per_layer(tmp_path / "b") == {0: STEPS * BATCH * K, 1: STEPS * BATCH * K}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # logged once
