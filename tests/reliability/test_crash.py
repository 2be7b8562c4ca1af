"""SIGKILL a writer at random points: flushed rows survive, loss <= one flush interval,
no temporary file is read as data, and the next writer of the same run works."""
from __future__ import annotations

import numpy as np
import pytest

import chrono
from chrono.cli import main as cli_main

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
