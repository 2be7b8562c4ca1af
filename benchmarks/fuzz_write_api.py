"""How many fuzz cases of the write API were tried, and how many were refused / accepted.

Runs the property of ``tests/reliability/test_fuzz_write_api.py`` (strategies and checks in
``tests/reliability/fuzz_write_api.py``) for ``--examples`` hypothesis examples (each a fresh
run with 1-6 random calls) and writes the counts to benchmarks/results/fuzz_write_api.json
(the number quoted in docs/reliability.md and the README). Any failed property stops the run
with hypothesis' minimal failing example.

    python benchmarks/fuzz_write_api.py [--examples 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks._common import write_result  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from hypothesis import HealthCheck, given, seed, settings
    from tqdm import tqdm

    spec = importlib.util.spec_from_file_location("fuzz_write_api", REPO / "tests" / "reliability" /
                                                  "fuzz_write_api.py")
    F = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(F)
    logging.getLogger("chrono").setLevel(logging.CRITICAL)
    bar = tqdm(total=args.examples, desc="write-API fuzz examples")

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(F.calls)
    def prop(case):
        F.run_case(case)
        bar.update(1)

    t0 = time.time()
    prop()
    bar.close()
    stats = dict(sorted(F.STATS.items()))
    calls = sum(v for k, v in stats.items() if k.endswith(" calls"))
    refused = sum(v for k, v in stats.items() if k.endswith(" refused"))
    payload = {"examples_passed": stats.get("examples", 0), "calls": calls, "refused": refused,
               "accepted": calls - refused, "per_method": stats, "seconds": round(time.time() - t0, 1),
               "load": os.getloadavg()[0], "failures": 0}
    path = write_result("fuzz_write_api", payload)
    print(f"{calls} write-API calls in {payload['examples_passed']} examples: {refused} refused, "
          f"{calls - refused} accepted and read back identically; 0 failures ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
