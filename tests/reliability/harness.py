"""Fault-injection helpers shared by the reliability tests and benchmarks/reliability_report.py."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import chrono
from chrono.store import table_dir

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("crash_child.py")


def child_env() -> dict:
    """Environment for subprocesses so that they import this checkout's chrono."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def plant_decoy_temp_part(root, run: str, table: str = "routing") -> Path:
    """A complete, valid Parquet file under a temporary part name (as if a writer died
    between writing and renaming it). Its rows have step -7; readers must never show them."""
    d = table_dir(root, table, run)
    d.mkdir(parents=True, exist_ok=True)
    t = pa.table({"run_id": [run], "step": pa.array([-7], pa.int64()), "mode": ["TRAIN"],
                  "layer": pa.array([0], pa.int32()), "expert": pa.array([0], pa.int32()),
                  "tokens": pa.array([1], pa.int64()), "weight_sum": pa.array([None], pa.float32()),
                  "dropped": pa.array([0], pa.int64()), "rank": pa.array([0], pa.int32())})
    path = d / ".part-00099-00000000.parquet.tmp"
    pq.write_table(t, path)
    return path


def temp_files(root) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


def kill_after(proc: subprocess.Popen, what: str, marker: bytes, target: int, jitter: float) -> list:
    """Wait for ``ready``, then for ``target`` stdout lines starting with ``marker``, sleep
    ``jitter`` (a random kill instant, not a wait for a condition), SIGKILL the child and
    return every stdout line it wrote, split into words."""
    consumed, rest = [], b""
    try:
        first_line = proc.stdout.readline()
        if first_line != b"ready\n":
            raise RuntimeError(f"{what} did not start: {first_line!r} {proc.stderr.read()[-3000:]!r}")
        seen = 0
        while seen < target:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{what} exited early: {proc.stderr.read()[-3000:]!r}")
            consumed.append(line)
            seen += line.startswith(marker)
        time.sleep(jitter)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return [ln.split() for ln in (b"".join(consumed) + rest).decode().splitlines() if ln]


def kill_writer_once(root, run: str, first: int, rng: random.Random, every: int = 5,
                     layers: int = 4, experts: int = 64, max_logged: int | None = None) -> dict:
    """Start a writer, SIGKILL it at a random point, and check what survived.

    The kill point: after a random number of ``logged`` lines (1 .. 3 flush
    intervals) plus a random jitter of 0-20 ms, so kills land inside
    ``log_routing``, between steps, and inside ``flush()`` (mid Parquet write
    or just before the rename). Returns the facts the caller asserts on.
    """
    target = rng.randint(1, max_logged or 3 * every)
    jitter = rng.uniform(0.0, 0.02)
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(root), run, str(first), str(every), str(layers), str(experts)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=str(REPO))
    lines = kill_after(proc, "writer", b"logged ", target, jitter)
    logged = [int(x[1]) for x in lines if x[0] == "logged"]
    flushed = [int(x[1]) for x in lines if x[0] == "flushed"]
    return {"target_lines": target, "last_logged": max(logged),
            # every step < this was reported durable (flush() returned) before the kill
            "last_flushed_reported": max(flushed, default=first),
            "returncode": proc.returncode}


def present_steps(root, run: str, table: str, lo: int, hi: int) -> dict[int, int]:
    """{step: rows} of ``table`` for ``run`` with lo <= step < hi, read through ``chrono.connect``."""
    con = chrono.connect(root)
    rows = con.execute(f"SELECT step, count(*) FROM {table} WHERE run_id = ? AND step >= ? AND step < ? "
                       "GROUP BY step", [run, lo, hi]).fetchall()
    return dict(rows)


def check_after_kill(root, run: str, first: int, facts: dict, every: int, layers: int,
                     experts: int) -> dict:
    """What survived one kill, per table: durable steps lost (must be 0), steps lost
    in total (must be <= one flush interval), partially visible steps and gaps (must
    be none), decoy temp-file rows seen (must be 0)."""
    out = {}
    for table, per_step in (("routing", layers * experts), ("signals", 1)):
        steps = present_steps(root, run, table, first, first + 10**6)
        n_present = len(steps)
        expected_prefix = set(range(first, first + n_present))
        out[table] = {
            "present": n_present,
            "gaps": sorted(expected_prefix ^ set(steps))[:5],
            "partial_steps": sorted(s for s, n in steps.items() if n != per_step)[:5],
            "durable_lost": max(0, facts["last_flushed_reported"] - (first + n_present)),
            "lost_steps": facts["last_logged"] + 1 - (first + n_present),
            "whole_flushes": n_present % every == 0,
        }
    out["decoy_rows_seen"] = len(present_steps(root, run, "routing", -7, -6))
    return out


def crash_loop(root, kills: int, seed: int, every: int = 5, layers: int = 4, experts: int = 64,
               run: str = "crash", progress=None) -> list[dict]:
    """SIGKILL ``kills`` writers of one run in a row (each resumes the run the last one
    left), checking after each kill. Returns one record per kill."""
    rng = random.Random(seed)
    records = []
    for i in range(kills):
        first = i * 100_000
        if i == 1:
            plant_decoy_temp_part(root, run)
        facts = kill_writer_once(root, run, first, rng, every, layers, experts)
        rec = {"kill": i, **facts, "temp_files_left": len(temp_files(root)),
               **check_after_kill(root, run, first, facts, every, layers, experts)}
        records.append(rec)
        if progress:
            progress(rec)
    return records


TRAIN_CHILD = Path(__file__).with_name("train_child.py")
TRAIN_LAYERS, TRAIN_EXPERTS, TRAIN_TOKENS_PER_STEP = 2, 4, 32 * 2  # moe_tiny: 2 layers, 4 experts, 32x top-2


def kill_training_once(root, run: str, rng: random.Random, every: int) -> dict:
    """Start a training process with probes, SIGKILL it after a random number of steps
    (1 .. 4 flush intervals) plus 0-50 ms, and check what survived under ``run``."""
    target = rng.randint(1, 4 * every)
    jitter = rng.uniform(0.0, 0.05)
    proc = subprocess.Popen([sys.executable, str(TRAIN_CHILD), str(root), run, str(every)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=str(REPO))
    lines = kill_after(proc, "training", b"step ", target, jitter)
    started = [int(x[1]) for x in lines if x[0] == "step"]
    durable = max([int(x[1]) for x in lines if x[0] == "durable"], default=0)
    steps = present_steps(root, run, "routing", 0, 10**9)
    rows = sum(steps.values())
    n_present = len(steps)
    con = chrono.connect(root)
    tokens = dict(con.execute("SELECT step, sum(tokens) FROM routing WHERE run_id = ? GROUP BY step",
                              [run]).fetchall())
    return {
        "returncode": proc.returncode,
        "last_step_started": max(started),
        "present_steps": n_present,
        "gaps": sorted(set(range(n_present)) ^ set(steps))[:5],
        "partial_steps": sorted(s for s, n in steps.items() if n != TRAIN_LAYERS * TRAIN_EXPERTS)[:5],
        "wrong_token_steps": sorted(s for s, t in tokens.items()
                                    if t != TRAIN_LAYERS * TRAIN_TOKENS_PER_STEP)[:5],
        "durable_rows_reported": durable,
        "durable_lost_rows": max(0, durable - rows),
        # steps started (the last one possibly unfinished) that are not on disk
        "lost_steps": max(started) + 1 - n_present,
        "temp_files_left": len(temp_files(root)),
    }


def training_crash_loop(root, kills: int, seed: int, every: int = 5, progress=None) -> list[dict]:
    """SIGKILL ``kills`` training processes, each on its own run under one root."""
    rng = random.Random(seed)
    out = []
    for i in range(kills):
        rec = {"kill": i, **kill_training_once(root, f"train-{i}", rng, every)}
        out.append(rec)
        if progress:
            progress(rec)
    return out
