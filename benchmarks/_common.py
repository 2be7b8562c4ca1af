"""Helpers shared by benchmark scripts: machine description and result files."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on (cores, memory, CPU model, load)."""
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_gib, 1) if mem_gib else None,
            "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0]}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def uptime() -> str:
    """The ``uptime`` line (load averages), to record next to any timing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def fresh_root(root: Path, run: str) -> Path:
    """One store per run under ``root``; a store left by a killed run is removed first
    (workloads refuse to append to an existing run)."""
    path = root / run
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
