"""Multi-rank telemetry under ``torchrun --nproc_per_node 2`` (gloo, CPU): DESIGN §8.

Each test starts the real launcher on ``worker.py`` (a tiny MoE trained for a
few steps with probes + the controller) and checks the store against what
each rank counted with its own hook.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import socket

import numpy as np
import pyarrow.parquet as pq
import pytest

import chrono
from chrono.store import PART_RE, part_files, run_dir, table_dir

from tests.conftest import free_port

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("worker.py")
LAYERS, E = 2, 8
STEPS, FLUSH = 5, 2            # windows: steps 0-1, 2-3, 4 (the last one closed at detach)
WINDOWS = 3
LAUNCH_TIMEOUT = 240


def torchrun(tmp: Path, run: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    root, out = tmp / "store", tmp / "out"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(WORKER), str(root), run, str(out), str(STEPS), str(FLUSH), *extra]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    return p, root, out


def rank_out(out: Path, r: int) -> dict:
    return json.loads((out / f"rank{r}.json").read_text())


def store_counts(root: Path, run: str, rank: int | None = None) -> np.ndarray:
    con = chrono.connect(root)
    where = "run_id = ?" + ("" if rank is None else " AND rank = ?")
    params = [run] + ([] if rank is None else [rank])
    got = con.sql(f"SELECT layer, expert, sum(tokens)::BIGINT AS n FROM routing WHERE {where} "
                  "GROUP BY ALL", params=params).to_arrow_table().to_pylist()
    a = np.zeros((LAYERS, E), dtype=np.int64)
    for r in got:
        a[r["layer"], r["expert"]] = r["n"]
    return a


def two_free_ports() -> int:
    """A port P with P and P + 1 both free (one /metrics endpoint per local rank)."""
    for _ in range(50):
        p = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    port = two_free_ports()
    p, root, out = torchrun(tmp, "dp", "--metrics-port", str(port))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (out / "port").write_text(str(port))
    return root, out


def test_each_rank_serves_metrics_on_its_own_port(dp_run):
    """metrics_port=P on two ranks of one node: rank r serves P + LOCAL_RANK, no clash."""
    _, out = dp_run
    port = int((out / "port").read_text())
    for r in (0, 1):
        scrape = rank_out(out, r)["scrape"]
        assert scrape["port"] == port + r
        # the global snapshot (identical on both ranks) is exported by each rank's endpoint
        assert 'chrono_neff{layer="0",run="dp"}' in scrape["body"]
        assert rank_out(out, r)["metrics_server_closed"]   # detach frees the port


def test_global_counts_are_the_sum_of_what_each_rank_routed(dp_run):
    root, out = dp_run
    per_rank = [np.array(rank_out(out, r)["counts"]) for r in (0, 1)]
    assert (per_rank[0] != per_rank[1]).any()          # ranks saw different data
    np.testing.assert_array_equal(store_counts(root, "dp"), per_rank[0] + per_rank[1])
    for r in (0, 1):   # each rank wrote exactly its own routing, tagged with its rank
        np.testing.assert_array_equal(store_counts(root, "dp", rank=r), per_rank[r])
    ranks = {int(PART_RE.match(Path(f).name).group(1)) for f in part_files(root, "routing", "dp")}
    assert ranks == {0, 1}


def test_snapshots_written_once_by_rank_zero_from_global_counts(dp_run):
    root, out = dp_run
    con = chrono.connect(root)
    snaps = con.sql("SELECT step, layer, token_count, n_experts FROM snapshots WHERE run_id = 'dp'"
                    ).to_arrow_table().to_pylist()
    keys = [(s["step"], s["layer"]) for s in snaps]
    assert len(keys) == len(set(keys)) == WINDOWS * (LAYERS + 1)     # + the global row per window
    files = part_files(root, "snapshots", "dp")
    assert files and all(Path(f).name.startswith("part-00000-") for f in files)
    total = np.array(rank_out(out, 0)["counts"]) + np.array(rank_out(out, 1)["counts"])
    for layer in range(LAYERS):
        assert sum(s["token_count"] for s in snaps if s["layer"] == layer) == total[layer].sum()
    # both ranks computed the same last snapshot (that is what makes their decisions equal)
    assert rank_out(out, 0)["latest_snapshot"] == rank_out(out, 1)["latest_snapshot"]
    assert all(rank_out(out, r)["stats"]["window_mismatches"] == 0 for r in (0, 1))
    assert all(rank_out(out, r)["stats"]["reduces"] == WINDOWS for r in (0, 1))


def test_decisions_identical_on_both_ranks_and_stored_once(dp_run):
    root, out = dp_run
    d0, d1 = rank_out(out, 0)["decisions"], rank_out(out, 1)["decisions"]
    assert len(d0) == WINDOWS * LAYERS
    assert d0 == d1
    assert rank_out(out, 0)["scales"] == rank_out(out, 1)["scales"]
    con = chrono.connect(root)
    stored = con.sql("SELECT step, layer, pressure, lens_scale, abstain FROM decisions "
                     "WHERE run_id = 'dp' ORDER BY step, layer").to_arrow_table().to_pylist()
    assert [(s["step"], s["layer"]) for s in stored] == [(d["step"], d["layer"]) for d in d0]
    assert [s["pressure"] for s in stored] == pytest.approx([d["pressure"] for d in d0])
    lines = (run_dir(root, "dp") / "control_decisions.jsonl").read_text().splitlines()
    assert len(lines) == len(d0)      # mirrored by rank 0 only


@pytest.mark.slow   # a second torchrun launch
def test_expert_parallel_slices_are_placed_in_the_global_expert_space(tmp_path):
    p, root, out = torchrun(tmp_path, "ep", "--ep")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    per_rank = [np.array(rank_out(out, r)["counts"]) for r in (0, 1)]
    assert per_rank[0][:, E // 2:].sum() == 0 and per_rank[1][:, :E // 2].sum() == 0
    np.testing.assert_array_equal(store_counts(root, "ep"), per_rank[0] + per_rank[1])
    for r in (0, 1):
        np.testing.assert_array_equal(store_counts(root, "ep", rank=r), per_rank[r])
    con = chrono.connect(root)
    n = con.sql("SELECT DISTINCT n_experts FROM snapshots WHERE run_id = 'ep' AND layer >= 0"
                ).to_arrow_table().column(0).to_pylist()
    assert n == [E]
    manifest = json.loads((run_dir(root, "ep") / "manifest.json").read_text())
    assert manifest["model"]["experts_per_layer"] == {str(l): E for l in range(LAYERS)}
    assert rank_out(out, 0)["decisions"] == rank_out(out, 1)["decisions"]


@pytest.mark.slow   # a second torchrun launch
def test_rank_killed_mid_run_leaves_the_store_readable(tmp_path):
    kill_after = 2 * FLUSH          # right after a window closed on both ranks
    p, root, out = torchrun(tmp_path, "killed", "--kill-rank", "1", "--kill-after", str(kill_after))
    assert p.returncode != 0        # the launcher reports the dead rank
    killed = np.array(rank_out(out, 1)["counts"])      # what rank 1 routed before SIGKILL
    # every part file on disk parses, none is skipped, no temporary file is visible to readers
    for table in ("routing", "snapshots", "decisions"):
        d = table_dir(root, table, "killed")
        names = sorted(n for n in os.listdir(d) if PART_RE.match(n)) if d.is_dir() else []
        assert len(part_files(root, table, "killed")) == len(names)
        for n in names:
            pq.read_table(d / n)
    np.testing.assert_array_equal(store_counts(root, "killed", rank=1), killed)
    con = chrono.connect(root)
    steps0 = con.sql("SELECT DISTINCT step FROM routing WHERE run_id = 'killed' AND rank = 0 "
                     "ORDER BY step").to_arrow_table().column(0).to_pylist()
    assert steps0[:kill_after] == list(range(kill_after))   # the survivor's flushed windows are there
    windows = con.sql("SELECT count(DISTINCT step) AS n FROM snapshots WHERE run_id = 'killed'"
                      ).to_arrow_table().column(0).to_pylist()[0]
    assert windows >= kill_after // FLUSH
    # the kernel released the dead rank's writer lock: the rank can be reopened at once
    with chrono.open_run(root, "killed", rank=1, world_size=2) as w:
        assert w.rank == 1


@pytest.mark.slow   # a second torchrun launch
def test_ranks_with_different_routers_are_refused_at_attach(tmp_path):
    p, root, out = torchrun(tmp_path, "mismatch", "--rank1-extra-layer")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in (0, 1):   # both ranks get the same clear error instead of a hang at the first flush
        err = rank_out(out, r)["error"]
        assert err and "ranks found different routers" in err


@pytest.mark.slow   # a second torchrun launch
def test_evaluation_script_without_steps_keeps_every_rank_rows(tmp_path):
    """Issue 15: two ranks, one no-grad forward each, no h.step(), detach: nothing is dropped.
    Each rank's routing is written as that rank's rows, without a collective at detach, and no
    global (snapshot) rows come from the unreduced step."""
    p, root, out = torchrun(tmp_path, "evalonly", "--eval-only")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in (0, 1):
        mine = np.array(rank_out(out, r)["counts"])
        assert mine.sum() == STEPS * (24 + 8 * r) * 2 * LAYERS
        np.testing.assert_array_equal(store_counts(root, "evalonly", rank=r), mine)
        assert rank_out(out, r)["stats"]["reduces"] == 0      # no collective at flush or detach
    con = chrono.connect(root)
    assert con.execute("SELECT count(*) FROM snapshots WHERE run_id = 'evalonly'").fetchone()[0] == 0
    assert set(con.execute("SELECT DISTINCT mode FROM routing WHERE run_id = 'evalonly'").fetchall()) == {("EVAL",)}


@pytest.mark.slow   # a torchrun launch
def test_uneven_steps_keep_every_rank_rows_when_a_collective_fails(tmp_path):
    """Review 11: rank 1 ends 3 more steps than rank 0 (an uneven last epoch), flush_every 2.
    Rank 0 leaves after its 3 flushes (windows 0-1, 2-3, 4); rank 1's 4th flush (steps 6-7)
    finds no partner: its all-reduce fails. That window's rank-local routing rows must still be
    written ("several ranks: nothing dropped"); before the fix the failed reduction lost them
    (a telemetry fault in step, rows of steps 6-7 gone). Truth: each rank's own router hook."""
    p, root, out = torchrun(tmp_path, "uneven", "--uneven", "3")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in (0, 1):
        mine = np.array(rank_out(out, r)["counts"])
        assert mine.sum() == (STEPS + 3 * r) * (24 + 8 * r) * 2 * LAYERS
        np.testing.assert_array_equal(store_counts(root, "uneven", rank=r), mine)
    steps = chrono.connect(root).execute("SELECT rank, count(DISTINCT step), max(step) FROM routing "
                                         "WHERE run_id = 'uneven' GROUP BY ALL ORDER BY ALL").fetchall()
    assert steps == [(0, STEPS, STEPS - 1), (1, STEPS + 3, STEPS + 2)]
    assert rank_out(out, 1)["stats"]["reduce_failures"] == 1   # then no collective: stopped
