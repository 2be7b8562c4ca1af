"""Readers while a writer appends; two writers of different runs; two of the same run."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import chrono
from chrono_cli.main import main as cli_main
from chrono.reader import run_readonly_sql
from chrono.store import StoreError, compact

LAYERS, EXPERTS = 4, 64
ROWS_PER_STEP = LAYERS * EXPERTS


@pytest.fixture(autouse=True)
def _h(harness):
    global _harness
    _harness = harness


def _start_writer(root, run, steps, every=3, first=0):
    return subprocess.Popen(
        [sys.executable, str(_harness.CHILD), str(root), run, str(first), str(every), str(LAYERS),
         str(EXPERTS), str(steps)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_harness.child_env(), cwd=str(_harness.REPO))


def _finish(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out


def test_readers_never_error_or_see_partial_parts_while_writer_appends(store_root, capsys):
    proc = _start_writer(store_root, "live", steps=150, every=3)
    assert proc.stdout.readline() == b"ready\n"
    reads, last_total, sqls = 0, 0, "SELECT step, count(*) AS n FROM routing GROUP BY step"
    con = chrono.connect(store_root)  # a long-lived reader (dashboard, exporter) that refreshes
    while proc.poll() is None or reads < 3:
        chrono.refresh(con)
        per_step = {r["step"]: r["n"] for r in run_readonly_sql(con, sqls).to_pylist()}
        assert all(n == ROWS_PER_STEP for n in per_step.values()), per_step  # never a partial part
        assert set(per_step) == set(range(len(per_step)))  # whole flushes, in order
        total = sum(per_step.values())
        assert total >= last_total  # a reader never sees rows disappear
        last_total = total
        # a fresh process-style reader: the CLI
        assert cli_main(["--root", str(store_root), "query", "SELECT count(*) AS n FROM routing",
                         "--format", "json"]) == 0
        n_cli = int(capsys.readouterr().out.split(":")[1].strip(" }\n"))
        assert n_cli % ROWS_PER_STEP == 0 and n_cli >= total
        reads += 1
    _finish(proc)
    chrono.refresh(con)
    assert run_readonly_sql(con, "SELECT count(*) AS n FROM routing").to_pylist() == [{"n": 150 * ROWS_PER_STEP}]
    assert reads >= 3


def test_reader_built_before_compaction_still_answers(store_root):
    with chrono.open_run(store_root, "c") as w:
        for s in range(6):
            w.log_routing(s, np.arange(LAYERS), np.ones((LAYERS, EXPERTS)))
            w.flush()
    con = chrono.connect(store_root)  # views list the 6 parts
    assert compact(store_root, "c") == {"routing": 6}  # ... which are now deleted
    got = run_readonly_sql(con, "SELECT count(*) AS n FROM routing").to_pylist()
    assert got == [{"n": 6 * ROWS_PER_STEP}]


def test_compaction_keeps_every_rank(store_root):
    for rank in (0, 1):
        with chrono.open_run(store_root, "ranks", rank=rank, world_size=2) as w:
            for s in range(3):
                w.log_routing(s, 0, np.full(4, rank + 1))
                w.flush()
    q = "SELECT rank, count(*) AS n, sum(tokens) AS t FROM routing GROUP BY rank ORDER BY rank"
    before = chrono.connect(store_root).sql(q).fetchall()
    assert compact(store_root, "ranks") == {"routing": 6}
    assert chrono.connect(store_root).sql(q).fetchall() == before == [(0, 12, 12), (1, 12, 24)]
    assert chrono.connect(store_root).sql("SELECT world_size FROM runs").fetchall() == [(2,)]


def test_two_writers_different_runs_do_not_collide(store_root):
    procs = [_start_writer(store_root, run, steps=60, every=4) for run in ("a", "b")]
    for p in procs:
        _finish(p)
    con = chrono.connect(store_root)
    rows = con.sql("SELECT run_id, count(*), count(DISTINCT step) FROM routing GROUP BY run_id "
                   "ORDER BY run_id").fetchall()
    assert rows == [("a", 60 * ROWS_PER_STEP, 60), ("b", 60 * ROWS_PER_STEP, 60)]
    assert sorted(r[0] for r in con.sql("SELECT run_id FROM runs").fetchall()) == ["a", "b"]


def test_second_writer_of_same_run_is_refused(store_root, capsys):
    with chrono.open_run(store_root, "solo") as w:
        for s in range(2):
            w.log_routing(s, 0, np.ones(4))
            w.flush()
        with pytest.raises(StoreError, match="already being written"):
            chrono.open_run(store_root, "solo")
        # another rank of the same run is a different writer and is fine
        with chrono.open_run(store_root, "solo", rank=1, world_size=2) as w1:
            w1.log_routing(0, 0, np.ones(4))
        # the CLI refuses to compact/snapshot a run being written: one line, exit 2
        assert cli_main(["--root", str(store_root), "compact", "solo"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "already being written" in err


def test_second_writer_in_another_process_is_refused(store_root):
    proc = _start_writer(store_root, "held", steps=10**6, every=1000)
    try:
        assert proc.stdout.readline() == b"ready\n"
        with pytest.raises(StoreError, match="already being written"):
            chrono.open_run(store_root, "held")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    with chrono.open_run(store_root, "held"):  # free again once the holder is gone
        pass
