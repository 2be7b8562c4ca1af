"""Communication cost of the probes' flush all-reduce, and its projection to a large job.

Measures, on 2 local processes with gloo (CPU), the time of the real
``probes.distributed.DistributedSync.reduce_window`` (ONE all-reduce of every
layer's counts + drops) against a grid of layers x experts, side by side with
the naive alternative (one all-reduce per layer, same bytes in total), and
projects the cost for a 64-rank, 58-layer, 256-expert job.

Projection formula (ring all-reduce, Thakur, Rabenseifner & Gropp, "Optimization
of Collective Communication Operations in MPICH", IJHPCA 2005, section 4):

    T(p, S) = 2 (p - 1) * alpha + 2 (p - 1) / p * S / beta

with S the payload in bytes (``payload_bytes``: 8 * (2 + 2 * layers * experts)),
alpha the per-message latency and beta the link bandwidth. Each rank sends
(and receives) 2 (p - 1) / p * S bytes. alpha and beta are fitted here by least
squares on the measured gloo times (T = 2 alpha + S / beta for p = 2), and the
projection is also given for stated network parameters.

usage: python benchmarks/distributed_comm.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_result  # noqa: E402
from probes.distributed import payload_bytes  # noqa: E402

BIG = {"ranks": 64, "layers": 58, "experts": 256}
# stated (not measured) interconnect for the second projection: 100 Gb/s, 10 us per message
NETWORK = {"alpha_s": 10e-6, "beta_bytes_per_s": 12.5e9, "label": "assumed 100 Gb/s link, 10 us latency"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, grid, reps: int, out: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from probes.distributed import Distributed, DistributedSync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    for layers, experts in tqdm(grid, disable=rank != 0, desc="layers x experts"):
        routers = [SimpleNamespace(layer=i, n_experts=experts, module=object()) for i in range(layers)]
        sync = DistributedSync(routers, Distributed())
        rng = np.random.default_rng(rank)
        counts = rng.integers(0, 1000, size=(layers, experts + 1)).astype(np.int64)
        drops = np.zeros_like(counts)
        local = [experts] * layers
        one, per_layer = [], []
        for r in range(reps + 2):   # 2 warm-up rounds
            dist.barrier()
            t0 = time.perf_counter()
            sync.reduce_window(counts, drops, local, 1, r)
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            for i in range(layers):   # the naive layout: one collective per layer
                t = torch.from_numpy(np.concatenate([counts[i, :experts], drops[i, :experts]]))
                dist.all_reduce(t)
            t3 = time.perf_counter()
            if r >= 2:
                one.append(t1 - t0)
                per_layer.append(t3 - t2)
        rows.append({"layers": layers, "experts": experts, "bytes": payload_bytes(layers, experts),
                     "one_collective_s": statistics.median(one),
                     "per_layer_collectives_s": statistics.median(per_layer)})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def ring_time(p: int, nbytes: float, alpha: float, beta: float | None) -> float:
    """Ring all-reduce time (Thakur, Rabenseifner & Gropp 2005)."""
    return 2 * (p - 1) * alpha + (0.0 if beta is None else 2 * (p - 1) / p * nbytes / beta)


def fit_alpha_beta(rows) -> tuple[float, float]:
    """Least squares of T = 2 alpha + S / beta (ring formula at p = 2) on the one-collective times."""
    S = np.array([r["bytes"] for r in rows], dtype=float)
    T = np.array([r["one_collective_s"] for r in rows], dtype=float)
    A = np.stack([np.full_like(S, 2.0), S], axis=1)
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, T, rcond=None)
    alpha = max(float(alpha), 0.0)
    # a non-positive slope means the byte term drowned in noise: report no bandwidth (None)
    beta = 1.0 / inv_beta if inv_beta > 0 else None
    return alpha, beta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, few repetitions (checks it works)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per point")
    a = ap.parse_args(argv)
    import torch.multiprocessing as mp

    layers_grid = (1, 8, 58) if a.quick else (1, 4, 16, 58)
    experts_grid = (8, 256) if a.quick else (8, 64, 256)
    grid = [(l, e) for l in layers_grid for e in experts_grid]
    reps = a.reps or (5 if a.quick else 30)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(2, _free_port(), grid, reps, out), nprocs=2, join=True)
        rows = json.loads(Path(out).read_text())
    load = os.getloadavg()
    alpha, beta = fit_alpha_beta(rows)
    S = payload_bytes(BIG["layers"], BIG["experts"])
    p = BIG["ranks"]
    projection = {
        **BIG, "payload_bytes": S, "bytes_sent_per_rank": 2 * (p - 1) / p * S,
        "formula": "T(p,S) = 2(p-1)*alpha + 2(p-1)/p * S/beta  (ring all-reduce; Thakur, Rabenseifner "
                   "& Gropp 2005)",
        "with_measured_gloo_loopback": {"alpha_s": alpha, "beta_bytes_per_s": beta,
                                        "seconds_per_flush": ring_time(p, S, alpha, beta)},
        "with_network": {**NETWORK, "seconds_per_flush": ring_time(p, S, NETWORK["alpha_s"],
                                                                   NETWORK["beta_bytes_per_s"])},
    }
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 processes, gloo, CPU)")
    print(f"{'layers':>6} {'experts':>7} {'bytes':>9} {'one all-reduce':>15} {'per-layer':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['layers']:>6} {r['experts']:>7} {r['bytes']:>9} {r['one_collective_s'] * 1e3:>12.3f} ms "
              f"{r['per_layer_collectives_s'] * 1e3:>9.3f} ms "
              f"{r['per_layer_collectives_s'] / r['one_collective_s']:>6.1f}")
    bw = "not resolvable (time did not grow with bytes)" if beta is None else f"{beta / 1e9:.3f} GB/s"
    print(f"fit (p=2 gloo loopback): alpha = {alpha * 1e6:.1f} us, beta = {bw}")
    print(f"projection {p} ranks x {BIG['layers']} layers x {BIG['experts']} experts: payload {S} B, "
          f"{projection['bytes_sent_per_rank']:.0f} B sent per rank per flush; "
          f"{projection['with_measured_gloo_loopback']['seconds_per_flush'] * 1e3:.2f} ms with the fitted "
          f"gloo numbers, {projection['with_network']['seconds_per_flush'] * 1e3:.2f} ms with "
          f"{NETWORK['label']}")
    path = write_result("distributed_comm_quick" if a.quick else "distributed_comm",
                        {"reps": reps, "load_avg": load, "rows": rows, "projection": projection})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
