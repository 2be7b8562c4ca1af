"""Bad input at the write API (issue 23): refused at the door with one error naming argument,
run, step and layer; nothing of the bad call written; rows logged before it intact."""
from __future__ import annotations

import json
import logging

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import chrono
from chrono_cli.main import main as cli_main
from chrono.store import run_dir
from chrono.validate import InvalidInputError

MODEL = {"layers": [0, 1], "experts_per_layer": {"0": 4, "1": 2}, "top_k": 2}


@pytest.fixture
def w(tmp_path):
    with chrono.open_run(tmp_path, "r", model=MODEL) as writer:
        writer.log_routing(0, 1, [5, 3])   # good rows that must survive every refusal
        yield writer


def _routing(root) -> list[tuple]:
    return sorted(chrono.connect(root).execute(
        "SELECT step, layer, expert, tokens FROM routing").fetchall())


GOOD = [(0, 1, 0, 5), (0, 1, 1, 3)]

# the calls of the table, plus the other variants of each kind of fault
ROUTING_BAD = [
    (dict(step=0, layer=0, counts=[1.0, np.nan, 2, 3]), "counts[1]", "step 0, layer 0"),
    (dict(step=1, layer=0, counts=[-5, 1, 2, 3]), "counts[0]", "step 1, layer 0"),
    (dict(step=2, layer=0, counts=[1.5, 1, 2, 3]), "not an integer", "step 2, layer 0"),
    (dict(step=3, layer=0, counts=[1, 2]), "layer 0 has 4 experts", "step 3, layer 0"),
    (dict(step=4, layer=7, counts=[1, 2, 3, 4]), "layer 7 is not declared", "step 4, layer 7"),
    (dict(step=-1, layer=0, counts=[1, 2, 3, 4]), "step = -1", "step -1, layer 0"),
    (dict(step=5, layer=-1, counts=[1, 2, 3, 4]), "layer = -1", "step 5, layer -1"),
    (dict(step=6, layer=0, counts=[1, 2, np.inf, 4]), "counts[2] = inf", "step 6, layer 0"),
    (dict(step=7, layer=0, counts=np.array([True, False, True, True])), "booleans", "step 7, layer 0"),
    (dict(step=8, layer=0, counts=["1", "2", "3", "4"]), "strings", "step 8, layer 0"),
    (dict(step=9, layer=0, counts=np.array([2 ** 63 + 5, 0, 0, 0], dtype=np.uint64)), "out of range",
     "step 9, layer 0"),
    (dict(step=10, layer=0, counts=[2 ** 53 + 2, 0, 0, 0]), "<= 9007199254740992", "step 10, layer 0"),
    (dict(step=11, layer=0, counts=[1, 2, 3, 4], mode="train"), "mode", "step 11, layer 0"),
    (dict(step=12, layer=0, counts=[1, 2, 3, 4], weight_sum=[1.0, 2.0]), "weight_sum has shape",
     "step 12, layer 0"),
    (dict(step=13, layer=0, counts=[1, 2, 3, 4], dropped=[0, -1, 0, 0]), "dropped[1]", "step 13, layer 0"),
    (dict(step=14, layer=0, counts=[1, 2, 3, 4], rank=-2), "rank", "step 14, layer 0"),
    (dict(step=2.5, layer=0, counts=[1, 2, 3, 4]), "step = 2.5 is not an integer", "step 2.5, layer 0"),
    (dict(step=True, layer=0, counts=[1, 2, 3, 4]), "booleans", "step True, layer 0"),
    (dict(step=15, layer=0, counts=5), "scalar", "step 15, layer 0"),
]


@pytest.mark.parametrize("kwargs,what,where", ROUTING_BAD)
def test_bad_routing_call_is_refused_and_writes_nothing(tmp_path, w, kwargs, what, where):
    with pytest.raises(ValueError) as e:
        w.log_routing(**kwargs)
    msg = str(e.value)
    assert isinstance(e.value, InvalidInputError)
    assert "run 'r'" in msg and what in msg and "nothing was written" in msg and "\n" not in msg
    assert f"at {where}:" in msg
    w.close()
    assert _routing(tmp_path) == GOOD
    assert cli_main(["--root", str(tmp_path), "snapshot", "r", "--every", "5"]) == 0


def test_batched_call_names_the_bad_cells_step_and_layer(tmp_path, w):
    counts = np.ones((3, 2, 4), dtype=np.int64)          # [steps, layers, experts]
    counts[2, 1, 3] = -7
    w.declare_experts(1, 4)
    with pytest.raises(InvalidInputError, match=r"step 22, layer 1: counts\[2, 1, 3\] = -7"):
        w.log_routing(np.array([20, 21, 22])[:, None], np.array([0, 1])[None, :], counts)
    with pytest.raises(InvalidInputError, match="step has shape"):
        w.log_routing(np.array([20, 21]), 0, np.ones((3, 4)))
    counts[2, 1, 3] = 7
    w.log_routing(np.array([20, 21, 22])[:, None], np.array([0, 1])[None, :], counts)
    w.flush()
    assert len(_routing(tmp_path)) == len(GOOD) + counts.size


def test_integral_floats_and_any_int_dtype_are_stored_exactly(tmp_path, w):
    w.log_routing(1, 0, np.array([1.0, 2.0, 0.0, 2.0 ** 53]))
    w.log_routing(2, 0, np.array([1, 2, 3, 4], dtype=np.uint8))
    w.log_routing(3, 1, np.array([7, 0], dtype=np.int16), weight_sum=np.array([np.nan, 0.5]))
    w.flush()
    got = _routing(tmp_path)
    assert (1, 0, 3, 2 ** 53) in got and (2, 0, 3, 4) in got and (3, 1, 0, 7) in got
    ws = chrono.read(tmp_path, "routing").filter(pl.col("step") == 3).sort("expert").collect()["weight_sum"]
    assert np.isnan(ws[0]) and ws[1] == 0.5   # a diverged router's weight is a kept fact


def test_expert_parallel_shards_stay_inside_the_declared_layer(tmp_path, w):
    w.log_routing(1, 0, [1, 2], expert_offset=2)       # experts 2, 3 of 4
    with pytest.raises(InvalidInputError, match="expert_offset"):
        w.log_routing(2, 0, [1, 2], expert_offset=3)   # would be expert 4
    w.flush()
    assert (1, 0, 3, 2) in _routing(tmp_path)


def test_growth_goes_through_an_explicit_declaration(tmp_path, w):
    with pytest.raises(InvalidInputError, match="declare_experts"):
        w.log_routing(1, 0, [1, 2, 3, 4, 5, 6])
    w.declare_experts(0, 6)
    w.log_routing(1, 0, [1, 2, 3, 4, 5, 6])
    w.log_routing(2, 0, [1, 1, 1, 1])          # a window from before the growth is still valid
    with pytest.raises(InvalidInputError):
        w.log_routing(3, 0, [1, 1, 1, 1, 1])   # 5 was never declared
    with pytest.raises(ValueError, match="n_experts"):
        w.declare_experts(0, 0)
    w.flush()
    m = json.loads((run_dir(tmp_path, "r") / "manifest.json").read_text())["model"]
    assert m["experts_per_layer"] == {"0": 6, "1": 2} and m["declared_experts"]["0"] == [4, 6]
    w.close()
    with chrono.open_run(tmp_path, "r", model=MODEL) as w2:   # reopened with the attach-time model
        w2.log_routing(200, 0, [1, 2, 3, 4, 5, 6])            # the history survives the reopen
    assert chrono.connect(tmp_path).execute("SELECT count(*) FROM routing WHERE step = 200").fetchone()[0] == 6


def test_a_manifest_without_counts_learns_each_layer_from_its_first_call(tmp_path):
    with chrono.open_run(tmp_path, "open") as w:
        w.log_routing(0, 3, [1, 2, 3])
        with pytest.raises(InvalidInputError, match="layer 3 has 3 experts"):
            w.log_routing(1, 3, [1, 2])
        w.log_routing(1, 5, [1, 2])     # nothing declared about layers at all: a new layer is fine
    with chrono.open_run(tmp_path, "listed", model={"layers": [0, 1]}) as w:
        w.log_routing(0, 1, [4, 4])
        with pytest.raises(InvalidInputError, match="layer 2 is not declared"):
            w.log_routing(0, 2, [4, 4])
    m = json.loads((run_dir(tmp_path, "open") / "manifest.json").read_text())["model"]
    assert m["experts_per_layer"] == {"3": 3, "5": 2} and m["layers_learned"] is True


@pytest.mark.parametrize("kwargs,what", [
    (dict(expert=[0, 4]), "expert[1] = 4 is beyond layer 0's 4 experts"),
    (dict(expert=[0, -1]), "expert[1] = -1"),
    (dict(expert=[0, 1], k=[0, 2]), "top_k 2"),
    (dict(expert=[0, 1], position=[1, 2, 3]), "position has 3 values for 2 rows"),
    (dict(expert=[0, 1], token_id=[5, -1]), "token_id[1] = -1"),
    (dict(expert=[0, 1], batch_idx=-1), "batch_idx = -1"),
    (dict(expert=[0, 1], layer=9), "layer 9 is not declared"),
    (dict(expert=[0, 1], mode="TRAINING"), "mode"),
    (dict(expert=[0.5]), "expert[0] = 0.5 is not an integer"),
])
def test_bad_token_rows_are_refused(tmp_path, w, kwargs, what):
    kwargs = dict(dict(step=3, layer=0), **kwargs)
    with pytest.raises(InvalidInputError, match=r"run 'r': log_tokens refused at step 3, layer \d+") as e:
        w.log_tokens(**kwargs)
    assert what in str(e.value)
    w.flush()
    assert chrono.connect(tmp_path).execute("SELECT count(*) FROM tokens").fetchone()[0] == 0


def test_unknown_token_ids_are_null_not_a_sentinel(tmp_path, w):
    w.log_tokens(3, 0, [0, 1, 2], token_id=[7, None, 9], weight=[0.5, np.nan, 1.0], k=[0, 1, 0])
    w.log_tokens(4, 1, [1, 0], token_id=pa.array([None, 4], pa.int64()))
    w.flush()
    rows = chrono.connect(tmp_path).execute(
        "SELECT step, expert, token_id FROM tokens ORDER BY step, expert").fetchall()
    assert rows == [(3, 0, 7), (3, 1, None), (3, 2, 9), (4, 0, 4), (4, 1, None)]


@pytest.mark.parametrize("args,kwargs,what", [
    ((1, "accuracy", np.nan), {}, "not finite"),
    ((1, "accuracy", 1.5), {}, "outside [0, 1]"),
    ((1, "teacher_agreement", -0.1), {}, "outside [0, 1]"),
    ((1, "var.cache_hit_rate", np.inf), {}, "not finite"),
    ((1, "", 1.0), {}, "non-empty string"),
    ((1, "a\nb", 1.0), {}, "control"),
    ((1, 5, 1.0), {}, "non-empty string"),
    ((1, "x", True), {}, "must be a number"),
    ((1, "x", "1.0"), {}, "must be a number"),
    ((1, "x", [1.0, 2.0]), {}, "one real number"),
    ((-3, "x", 1.0), {}, "step = -3"),
    ((1.5, "x", 1.0), {}, "not an integer"),
    ((1, "x", 1.0), {"layer": -1}, "layer = -1"),
])
def test_bad_signals_are_refused(tmp_path, w, args, kwargs, what):
    with pytest.raises(InvalidInputError, match=r"run 'r': log_signal refused at step") as e:
        w.log_signal(*args, **kwargs)
    assert what in str(e.value)


def test_a_diverged_loss_is_a_fact_kept(tmp_path, w):
    for i, name in enumerate(["loss", "val_loss", "var.val_loss", "semantic_moe.distill_loss"]):
        w.log_signal(i, name, np.nan if i % 2 else np.inf)
    w.log_signal(9, "accuracy", np.float32(0.75))
    w.log_signal(9, "note", None)
    w.flush()
    w.close()
    vals = dict(chrono.connect(tmp_path).execute("SELECT name, value FROM signals").fetchall())
    assert vals["loss"] == np.inf and np.isnan(vals["val_loss"]) and vals["accuracy"] == 0.75
    assert vals["note"] is None
    assert cli_main(["--root", str(tmp_path), "show", "r"]) == 0


@pytest.mark.parametrize("table,row,what", [
    ("lifecycle", dict(step=1, layer=0, event="explode", expert=0, n_experts_after=4, applied=True,
                       reason=""), "not one of"),
    ("lifecycle", dict(step=1, layer=0, event="prune", expert=0, n_experts_after=4, applied="yes",
                       reason=""), "True or False"),
    ("lifecycle", dict(step=1, layer=0, event="prune", expert=0, applied=True, reason=""),
     "'n_experts_after'] is missing"),
    ("lifecycle", dict(step=1, layer=0, event="prune", expert=0, n_experts_after=4, applied=True,
                       reason="", typo=1), "unknown column"),
    ("snapshots", dict(step=9, window_start=0, window_end=9, layer=0, n_experts=4, token_count=10,
                       entropy=1.0, neff=float("nan"), top2_share=0.5, dead=0, nearly_dead=0, cv=0.0,
                       max_violation=0.0, gini=0.0, jain=1.0, drop_fraction=0.0), "'neff'] = nan"),
    ("alerts", dict(step=9, layer=0, alert="COLLAPSE", transition="raised", consecutive=3, n_experts=4,
                    token_count=1, neff=1.0, top2_share=1.0, dead=3), "not one of"),
    ("routing", dict(step=1, layer=0, expert=9, tokens=1), "beyond layer 0's 4 experts"),
    ("routing", dict(step=1, layer=0, expert=1, tokens=1, mode="X"), "not one of"),
    ("signals", dict(step=1, name="accuracy", value=2.0), "outside [0, 1]"),
    ("signals", dict(step=1, name="loss", value=1.0, run_id="other"), "is not this run"),
])
def test_bad_rows_are_refused_whole(tmp_path, w, table, row, what):
    good = dict(step=1, layer=0, event="prune", expert=-1, n_experts_after=4, applied=False, reason="r")
    rows = [good, row] if table == "lifecycle" else [row]
    with pytest.raises(InvalidInputError, match=r"log_rows\('%s'\) refused at step" % table) as e:
        w.log_rows(table, rows)
    assert what in str(e.value)
    with pytest.raises(InvalidInputError, match="not one of"):
        w.log_rows("nope", [row])
    w.log_rows("lifecycle", [good])   # a spawn refused by the model names no expert: -1 is valid
    w.flush()
    assert chrono.connect(tmp_path).execute(f"SELECT count(*) FROM {table}").fetchone()[0] == \
        {"lifecycle": 1, "routing": len(GOOD)}.get(table, 0)


def test_probes_style_writer_counts_refusals_and_never_raises(tmp_path, caplog):
    with chrono.open_run(tmp_path, "p", model=MODEL, on_error="count") as w:
        with caplog.at_level(logging.ERROR, logger="chrono.store"):
            w.log_routing(0, 0, [1, -1, 0, 0])
            w.log_routing(1, 0, [1, -1, 0, 0])
            w.log_signal(0, "accuracy", 7.0)
        w.log_routing(2, 0, [1, 1, 0, 0])
        assert w.stats.calls_refused == 3 and w.stats.write_errors == 3
        assert "InvalidInputError" in w.stats.last_error
    assert len([r for r in caplog.records if "log_routing refused" in r.getMessage()]) == 1
    assert _routing(tmp_path) == [(2, 0, 0, 1), (2, 0, 1, 1), (2, 0, 2, 0), (2, 0, 3, 0)]


def test_lifecycle_events_declare_the_new_count(tmp_path):
    from chrono.lifecycle import record_event

    with chrono.open_run(tmp_path, "bio", model={"layers": [0], "experts_per_layer": {"0": 1}}) as w:
        w.log_routing(0, 0, [8])
        record_event(w, 1, 0, "grow", 2, 3, reason="stage 1")
        w.log_routing(1, 0, [3, 3, 2])
        assert w.stats.calls_refused == 0
    assert json.loads((run_dir(tmp_path, "bio") / "manifest.json").read_text())["model"][
        "experts_per_layer"] == {"0": 3}


def test_probes_declare_routers_that_grow_and_shrink(tmp_path, moe_tiny):
    """Probes write through the same door: a router's new count is declared before its rows."""
    import probes
    import torch

    torch.manual_seed(0)
    model = moe_tiny.TinyMoE()

    def change(s):
        if s == 5:
            model.routers[1].n_experts = 6   # grew mid-window (window 4-7 is written with 6)
        if s == 9:
            model.routers[1].n_experts = 3   # pruned mid-window

    with probes.attach(model, run="life", root=tmp_path, flush_every=4) as h:
        moe_tiny.train_steps(model, 14, batch=8, on_step=change)
    assert h.writer.stats.calls_refused == 0 and h.stats()["write_errors"] == 0
    m = json.loads((run_dir(tmp_path, "life") / "manifest.json").read_text())["model"]
    assert m["experts_per_layer"]["1"] == 3 and m["declared_experts"]["1"] == [3, 4, 6]
    per_step = dict(chrono.connect(tmp_path).execute(
        "SELECT step, count(*) FROM routing WHERE layer = 1 GROUP BY step").fetchall())
    assert per_step[0] == 4 and per_step[4] == 6 and per_step[13] == 3
