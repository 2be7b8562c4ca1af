"""Run ``benchmarks/probe_overhead.py`` with in-hook time measured as thread CPU time.

On a shared, loaded machine the wall time spent inside a hook includes time the
thread was descheduled; thread CPU time (``time.thread_time``) does not. With
``--threads 1`` all hook work runs in the training thread, so the in-hook CPU
time is the cost of the hooks themselves. Used to compare two checkouts
(alternating processes) when the machine is not quiet; step times in the
output are still wall times.

usage: python benchmarks/hook_cpu_time.py [probe_overhead.py options]
"""
import runpy
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import probes.router_hook as H  # noqa: E402  (the router hook times itself there)

H.time = types.SimpleNamespace(perf_counter=time.thread_time)
sys.argv = ["probe_overhead.py"] + sys.argv[1:]
runpy.run_path(str(ROOT / "benchmarks" / "probe_overhead.py"), run_name="__main__")
