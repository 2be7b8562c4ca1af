"""Fault-injection report: faults injected, times tried, data lost, training crashes.

Runs the same fault harness as ``tests/reliability`` many times and prints the
table for the README (and writes benchmarks/results/reliability_report.json).
"Data lost" counts rows missing beyond the unflushed buffer: rows a writer had
reported on disk, or rows logged before a storage fault that are absent after
the fault cleared. "Training crashes" counts exceptions that reached the
training loop. Both must be 0.

    python benchmarks/reliability_report.py [--quick]
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import chrono  # noqa: E402
import chrono.store as store  # noqa: E402
import chrono.store.writer as store_writer  # noqa: E402
from benchmarks._common import write_result  # noqa: E402


def _load(name):
    spec = importlib.util.spec_from_file_location(f"rel_{name}", REPO / "tests" / "reliability" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


harness = _load("harness")


def row(fault, tried, lost, crashes, note=""):
    return {"fault": fault, "tried": tried, "data_lost_rows": lost, "training_crashes": crashes, "note": note}


def writer_kills(n, seed):
    with tempfile.TemporaryDirectory() as d:
        recs = harness.crash_loop(d, kills=n, seed=seed)
    lost = sum(r[t]["durable_lost"] for r in recs for t in ("routing", "signals"))
    torn = sum(len(r[t]["partial_steps"]) + len(r[t]["gaps"]) for r in recs for t in ("routing", "signals"))
    decoy = sum(r["decoy_rows_seen"] for r in recs)
    max_loss = max(r[t]["lost_steps"] for r in recs for t in ("routing", "signals"))
    return row("SIGKILL of a writer process (random point, same run resumed)", n, lost + torn + decoy, 0,
               f"unflushed steps lost: max {max_loss} (flush interval 5); torn steps {torn}; "
               f"temp-file rows seen {decoy}")


def training_kills(n, seed):
    with tempfile.TemporaryDirectory() as d:
        recs = harness.training_crash_loop(d, kills=n, seed=seed, every=5)
    lost = sum(r["durable_lost_rows"] for r in recs)
    torn = sum(len(r["partial_steps"]) + len(r["gaps"]) + len(r["wrong_token_steps"]) for r in recs)
    return row("SIGKILL of a training process with probes", n, lost + torn, 0,
               f"steps lost (unflushed window + write queue): max {max(r['lost_steps'] for r in recs)}, "
               f"flush interval 5; torn steps {torn}")


def _storage_fault(kind, root):
    """One writer (on_error='count') logging 6 steps with the fault on for steps 2-3."""
    crashes = 0
    with chrono.open_run(root, "r", on_error="count") as w:
        patches = {
            "disk full (ENOSPC on write)": lambda: mock.patch.object(
                store_writer.pq, "write_table", side_effect=OSError(errno.ENOSPC, "No space left on device")),
            "read-only file system (EROFS)": lambda: mock.patch.object(
                store_writer.pq, "write_table", side_effect=OSError(errno.EROFS, "Read-only file system")),
            "permission denied (EACCES on rename)": lambda: mock.patch.object(
                store_writer.os, "replace", side_effect=PermissionError(errno.EACCES, "Permission denied")),
        }
        for step in range(6):
            try:
                w.log_routing(step, np.arange(2), np.ones((2, 4)))
                if step in (2, 3):
                    if kind in patches:
                        with patches[kind]():
                            w.flush()
                    elif kind == "run directory deleted":
                        if step == 2:
                            store.delete_run(root, "r")   # metadata directory and every partition
                        w.flush()
                    elif kind == "run directory replaced by a file":
                        store.delete_run(root, "r")
                        paths = [store.run_dir(root, "r"), store.table_dir(root, "routing", "r")]
                        for p in paths:
                            p.write_text("x")
                        w.flush()
                        for p in paths:
                            p.unlink()
                else:
                    w.flush()
            except Exception:
                crashes += 1
        errors = w.stats.write_errors
    present = dict(chrono.connect(root).sql("SELECT step, count(*) FROM routing GROUP BY step").fetchall())
    # deleting the directory (at step 2) takes the parts already in it along (the user
    # deleted them): only rows logged from step 2 on are expected there
    expected = range(2, 6) if kind.startswith("run directory") else range(6)
    lost = sum(8 - present.get(s, 0) for s in expected)
    return lost, crashes, errors


def storage_faults(tries):
    out = []
    kinds = ["disk full (ENOSPC on write)", "read-only file system (EROFS)",
             "permission denied (EACCES on rename)", "run directory deleted", "run directory replaced by a file"]
    logging.getLogger("chrono.store").setLevel(logging.CRITICAL)
    for kind in kinds:
        lost = crashes = errors = 0
        for _ in range(tries):
            with tempfile.TemporaryDirectory() as d:
                l_, c, e = _storage_fault(kind, d)
                lost, crashes, errors = lost + l_, crashes + c, errors + e
        out.append(row(f"storage: {kind}", tries, lost, crashes, f"write errors counted: {errors}"))
    return out


def model_faults():
    import torch

    import probes

    moe_tiny = _load("moe_tiny")
    logging.getLogger("probes").setLevel(logging.CRITICAL)
    out = []
    faults = ["nan_logits", "inf_logits", "nan_weights", "index_too_large", "index_negative",
              "wrong_shapes", "float_indices", "not_a_tuple", "zero_token_batches", "experts_grow",
              "experts_shrink"]
    for fault in faults:
        crashes, lost, note = 0, 0, ""
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            model = moe_tiny.TinyMoE()
            batch = 0 if fault == "zero_token_batches" else 8

            def change(s, model=model):
                if fault == "experts_grow" and s == 5:
                    model.routers[1].n_experts = 6
                if fault == "experts_shrink" and s == 6:
                    model.routers[1].n_experts = 3

            if fault in moe_tiny.__dict__.get("FAULTS", ()) or not fault.startswith(("zero", "experts")):
                model.routers[0].fault = fault
            try:
                with probes.attach(model, run="r", root=d, flush_every=4) as h:
                    losses = moe_tiny.train_steps(model, 10, batch=batch, on_step=change)
                st = h.stats()
                note = (f"nonfinite {st['nonfinite']}, invalid indices {st['invalid_indices']}, "
                        f"faults {st['faults']}")
                if fault.startswith("experts"):
                    got = dict(chrono.connect(d).sql("SELECT layer, sum(tokens) FROM routing GROUP BY layer")
                               .fetchall())
                    lost = 10 * 8 * 2 - int(got.get(1, 0))
                    note += f"; layer-1 tokens recorded {int(got.get(1, 0))} of 160"
                if batch and not all(math.isfinite(x) for x in losses):
                    note += "; non-finite loss"
            except Exception as e:
                crashes += 1
                note = f"{type(e).__name__}: {e}"
        out.append(row(f"model: {fault.replace('_', ' ')}", 1, lost, crashes, note))
    with tempfile.TemporaryDirectory() as d:
        try:
            probes.attach(torch.nn.Sequential(torch.nn.Linear(2, 2)), run="x", root=d)
            out.append(row("model: no routers", 1, 0, 0, "NOT refused"))
        except probes.ProbeError:
            out.append(row("model: no routers", 1, 0, 0, "refused at attach with ProbeError"))
    return out


def user_input():
    import subprocess

    env = harness.child_env()
    cases = [["show", "../etc"], ["show", "run\n"], ["compact", "/abs"], ["query", "DROP VIEW routing"],
             ["query", "COPY routing TO '/tmp/chrono-report-x.csv'"], ["query", "ATTACH '/tmp/x.db'"],
             ["query", "SELECT * FROM read_text('/etc/passwd')"], ["--bogus"], ["query", "SELECT 1", "--bogus"],
             ["snapshot", "r", "--every", "0"]]
    ok = 0
    with tempfile.TemporaryDirectory() as d:
        with chrono.open_run(d, "r") as w:
            w.log_routing(0, 0, np.ones(4))
        before = sorted(str(p) for p in Path(d).rglob("*"))
        for argv in cases:
            p = subprocess.run([sys.executable, "-m", "chrono_cli", "--root", d, *argv], capture_output=True,
                               env=env, cwd=str(REPO))
            ok += p.returncode == 2 and p.stderr.count(b"\n") == 1 and b"Traceback" not in p.stderr
        changed = sorted(str(p) for p in Path(d).rglob("*")) != before
    return row("bad user input via the CLI (run ids, hostile SQL, options)", len(cases), 0, 0,
               f"one-line error + exit 2: {ok}/{len(cases)}; disk changed: {changed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (checks the script works)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_writer, n_train, n_storage = (4, 2, 2) if args.quick else (40, 10, 10)
    t0 = time.time()
    steps = [lambda: [writer_kills(n_writer, args.seed)], lambda: [training_kills(n_train, args.seed)],
             lambda: storage_faults(n_storage), model_faults, lambda: [user_input()]]
    rows = []
    for fn in tqdm(steps, desc="fault families", file=sys.stderr):
        rows.extend(fn())
    print("| fault injected | times tried | data lost (rows beyond unflushed buffer) | training crashes | notes |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['tried']} | {r['data_lost_rows']} | {r['training_crashes']} | {r['note']} |")
    path = write_result("reliability_report" + ("_quick" if args.quick else ""),
                        {"rows": rows, "seconds": round(time.time() - t0, 1), "quick": args.quick})
    print(f"\nwrote {path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
