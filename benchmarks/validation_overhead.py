"""What the write API's door (``chrono.validate``) costs: checked vs unchecked RunWriter calls.

Same arrays, same run layout, interleaved repetitions with an A/A control (two checked arms):
per-token ingest (``log_tokens``, the batches of ``store_ingest.py``) and aggregated routing
(``log_routing`` of a [steps, layers, experts] window, what probes write per flush). The
unchecked arm calls the method without its ``@door`` wrapper (``__wrapped__``).

    python benchmarks/validation_overhead.py [--rows 2000000] [--reps 5] [--quick]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chrono  # noqa: E402
from benchmarks._common import write_result  # noqa: E402
from benchmarks.store_ingest import LAYERS, make_steps  # noqa: E402
from chrono.store import RunWriter  # noqa: E402

UNCHECKED = {"log_tokens": RunWriter.log_tokens.__wrapped__, "log_routing": RunWriter.log_routing.__wrapped__}


def tokens_arm(root: Path, batches, checked: bool) -> float:
    with chrono.open_run(root, "ingest", model={"layers": list(range(LAYERS)), "top_k": 2}) as w:
        call = w.log_tokens if checked else (lambda **kw: UNCHECKED["log_tokens"](w, **kw))
        t0 = time.perf_counter()
        for i, bt in enumerate(batches):
            call(**bt)
            if (i + 1) % (50 * LAYERS) == 0:
                w.flush()
        w.flush()
        return time.perf_counter() - t0


def routing_arm(root: Path, windows: int, checked: bool, steps=50, layers=32, experts=64) -> float:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, size=(windows, steps, layers, experts))
    model = {"layers": list(range(layers)), "experts_per_layer": {str(l): experts for l in range(layers)}}
    with chrono.open_run(root, "routing", model=model) as w:
        t0 = time.perf_counter()
        for i in range(windows):
            kw = dict(step=(i * steps + np.arange(steps))[:, None], layer=np.arange(layers)[None, :],
                      counts=counts[i], weight_sum=counts[i] * 0.5, dropped=np.zeros_like(counts[i]))
            w.log_routing(**kw) if checked else UNCHECKED["log_routing"](w, **kw)
            w.flush()
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="per-token rows per arm")
    ap.add_argument("--windows", type=int, default=40, help="routing windows (50 steps x 32 layers x 64)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.windows, args.reps = 200_000, 4, 1
    batches = make_steps(args.rows)
    arms = {"checked": True, "checked_again (A/A)": True, "unchecked": False}
    times = {k: {"tokens": [], "routing": []} for k in arms}
    for rep in range(args.reps):
        order = list(arms)[rep % 3:] + list(arms)[:rep % 3]   # rotate the order every repetition
        for name in order:
            tmp = Path(tempfile.mkdtemp(prefix="chrono-validate-"))
            try:
                times[name]["tokens"].append(tokens_arm(tmp / "t", batches, arms[name]))
                times[name]["routing"].append(routing_arm(tmp / "r", args.windows, arms[name]))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    med = {k: {t: float(np.median(v)) for t, v in d.items()} for k, d in times.items()}
    result = {"rows": sum(len(b["expert"]) for b in batches), "routing_windows": args.windows,
              "reps": args.reps, "median_seconds": med, "seconds": times, "load_1m": os.getloadavg()[0]}
    for t in ("tokens", "routing"):
        ratio = med["checked"][t] / med["unchecked"][t]
        aa = med["checked_again (A/A)"][t] / med["checked"][t]
        result[f"{t}_checked_over_unchecked"], result[f"{t}_aa"] = ratio, aa
        print(f"{t:8s}: checked / unchecked x{ratio:.3f}  (A/A x{aa:.3f}; medians "
              f"{med['checked'][t]:.3f} s vs {med['unchecked'][t]:.3f} s)")
    print(f"load {result['load_1m']:.1f}")
    if not args.quick:
        print("wrote", write_result("validation_overhead", result))


if __name__ == "__main__":
    main()
