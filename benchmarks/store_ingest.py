"""Token-level ingest: chrono's RunWriter vs one JSON object per event (JSONL), same rows, same run.

Each step produces the per-token routing facts of a batch (step, layer,
batch_idx, position, k, expert, weight, token_id). Both writers get exactly
the same arrays; time covers buffering, encoding and writing to disk
(the chrono writer flushes a Parquet part every ``--flush-every`` steps).

    python benchmarks/store_ingest.py [--rows 4000000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chrono  # noqa: E402
from benchmarks._common import write_result  # noqa: E402

LAYERS, EXPERTS, TOP_K, BATCH, SEQ = 4, 8, 2, 8, 256


def make_steps(n_rows: int, seed: int = 0):
    """Yield per-(step, layer) column batches totalling ``n_rows`` rows."""
    rng = np.random.default_rng(seed)
    per = BATCH * SEQ * TOP_K
    batches = []
    b = np.repeat(np.arange(BATCH, dtype=np.int32), SEQ * TOP_K)
    pos = np.tile(np.repeat(np.arange(SEQ, dtype=np.int32), TOP_K), BATCH)
    k = np.tile(np.arange(TOP_K, dtype=np.int16), BATCH * SEQ)
    step = 0
    while len(batches) * per < n_rows:
        for layer in range(LAYERS):
            batches.append(dict(step=step, layer=layer, batch_idx=b, position=pos, k=k,
                                expert=rng.integers(0, EXPERTS, per, dtype=np.int32),
                                weight=rng.random(per, dtype=np.float32),
                                token_id=rng.integers(0, 50_000, per)))
        step += 1
    return batches


def chrono_writer(root: Path, batches, flush_every: int) -> float:
    t0 = time.perf_counter()
    with chrono.open_run(root, "ingest") as w:
        for i, bt in enumerate(batches):
            w.log_tokens(**bt)
            if (i + 1) % (flush_every * LAYERS) == 0:
                w.flush()
    return time.perf_counter() - t0


def jsonl_writer(root: Path, batches) -> float:
    """The common practice: one dict and one json.dumps per event."""
    t0 = time.perf_counter()
    with open(root / "events.jsonl", "w") as f:
        for bt in batches:
            n = len(bt["expert"])
            cols = {k: (v.tolist() if isinstance(v, np.ndarray) else [v] * n) for k, v in bt.items()}
            for j in range(n):
                f.write(json.dumps({"run_id": "ingest", "step": cols["step"][j], "layer": cols["layer"][j],
                                    "batch_idx": cols["batch_idx"][j], "position": cols["position"][j],
                                    "k": cols["k"][j], "expert": cols["expert"][j],
                                    "weight": cols["weight"][j], "token_id": cols["token_id"][j]}) + "\n")
    return time.perf_counter() - t0


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--jsonl-rows", type=int, default=1_000_000,
                    help="rows for the (slow) JSONL writer; its rate is per row, same data prefix")
    ap.add_argument("--flush-every", type=int, default=50, help="steps per Parquet part")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.jsonl_rows, args.reps = 200_000, 50_000, 1
    batches = make_steps(args.rows)
    rows = sum(len(b["expert"]) for b in batches)
    jl_batches = batches[: max(1, args.jsonl_rows // len(batches[0]["expert"]))]
    jl_rows = sum(len(b["expert"]) for b in jl_batches)
    chrono_s, jsonl_s = [], []
    for rep in range(args.reps):  # interleaved repetitions
        tmp = Path(tempfile.mkdtemp(prefix="chrono-ingest-"))
        try:
            chrono_s.append(chrono_writer(tmp / "store", batches, args.flush_every))
            c_bytes = dir_bytes(tmp / "store")
            jsonl_s.append(jsonl_writer(tmp, jl_batches))
            j_bytes = (tmp / "events.jsonl").stat().st_size
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    c_rate = rows / float(np.median(chrono_s))
    j_rate = jl_rows / float(np.median(jsonl_s))
    result = {
        "rows": rows, "jsonl_rows": jl_rows, "reps": args.reps,
        "chrono_rows_per_s": c_rate, "jsonl_rows_per_s": j_rate, "speedup": c_rate / j_rate,
        "chrono_bytes_per_row": c_bytes / rows, "jsonl_bytes_per_row": j_bytes / jl_rows,
        "chrono_seconds": chrono_s, "jsonl_seconds": jsonl_s,
    }
    print(f"chrono RunWriter : {c_rate / 1e6:8.2f} M rows/s  {result['chrono_bytes_per_row']:6.1f} B/row")
    print(f"JSONL per event  : {j_rate / 1e6:8.3f} M rows/s  {result['jsonl_bytes_per_row']:6.1f} B/row")
    print(f"ratio            : x{result['speedup']:.1f} faster, x{result['jsonl_bytes_per_row'] / result['chrono_bytes_per_row']:.1f} smaller")
    if not args.quick:
        print("wrote", write_result("store_ingest", result))


if __name__ == "__main__":
    main()
