"""SIGKILL a writer at random points: flushed rows survive, loss <= one flush interval,
no temporary file is read as data, and the next writer of the same run works."""
from __future__ import annotations

import numpy as np
import pytest

import chrono
from chrono_cli.main import main as cli_main

EVERY, LAYERS, EXPERTS = 5, 4, 64


def _check(records):
    for rec in records:
        assert rec["returncode"] == -9, rec  # really killed, not a clean exit
        for table in ("routing", "signals"):
            r = rec[table]
            assert r["durable_lost"] == 0, (table, rec)  # every row reported flushed is there
            assert r["gaps"] == [] and r["partial_steps"] == [], (table, rec)  # no torn parts
            assert r["whole_flushes"], (table, rec)
            assert 0 <= r["lost_steps"] <= EVERY, (table, rec)  # at most the unflushed buffer
        assert rec["decoy_rows_seen"] == 0, rec  # a complete but unrenamed temp part stays invisible


def _next_writer_works(harness, root, run):
    before = harness.present_steps(root, run, "routing", 0, 10**9)
    with chrono.open_run(root, run) as w:  # the kernel released the dead writer's lock
        w.log_routing(10**8, np.arange(LAYERS), np.ones((LAYERS, EXPERTS)))
    after = harness.present_steps(root, run, "routing", 0, 10**9)
    assert after == {**before, 10**8: LAYERS * EXPERTS}
    # the writer's own stale temp parts were removed when it took the lock; only the decoy
    # (another rank's name) may remain
    assert all(p.name.startswith(".part-00099-") for p in harness.temp_files(root))
    assert cli_main(["--root", str(root), "runs"]) == 0


def test_sigkill_writer_few_times(store_root, harness):
    records = harness.crash_loop(store_root, kills=3, seed=1, every=EVERY, layers=LAYERS, experts=EXPERTS)
    _check(records)
    _next_writer_works(harness, store_root, "crash")


@pytest.mark.slow
def test_sigkill_writer_many_times(store_root, harness):
    records = harness.crash_loop(store_root, kills=20, seed=2, every=EVERY, layers=LAYERS, experts=EXPERTS)
    _check(records)
    _next_writer_works(harness, store_root, "crash")


TRAIN_EVERY = 5


@pytest.mark.slow
def test_sigkill_real_training_with_probes(store_root, harness):
    """A training process with probes attached, killed at random points: every row the
    writer reported on disk is there, no step is torn, and at most the unflushed buffer is
    lost. Probes wait for a window's write when they close it, so that buffer is the open
    window: at most one flush interval of finished steps (plus the step in progress)."""
    records = harness.training_crash_loop(store_root, kills=5, seed=3, every=TRAIN_EVERY)
    for rec in records:
        assert rec["returncode"] == -9, rec
        assert rec["durable_lost_rows"] == 0, rec
        assert rec["gaps"] == [] and rec["partial_steps"] == [] and rec["wrong_token_steps"] == [], rec
        assert rec["present_steps"] % TRAIN_EVERY == 0, rec  # whole windows only
        # lost_steps counts the step in progress at the kill too: at most one flush interval
        # of finished steps is lost (probes wait for a window's write at the end of the next step)
        assert 0 <= rec["lost_steps"] <= TRAIN_EVERY + 1, rec
    con = chrono.connect(store_root)
    assert len(con.sql("SELECT run_id FROM runs").fetchall()) == 5
    with chrono.open_run(store_root, "train-0") as w:  # a killed run can be reopened at once
        assert w.next_step == 1 + con.sql("SELECT max(step) FROM routing WHERE run_id = 'train-0'"
                                          ).fetchall()[0][0]     # and continues after its steps
        w.log_signal(w.next_step, "resumed", 1.0)
