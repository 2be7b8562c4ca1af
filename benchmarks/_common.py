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


def fmt(x, width: int, places: int = 2) -> str:
    """``x`` right-aligned in ``width`` with ``places`` decimals, or ``-`` when it is None."""
    return f"{x:{width}.{places}f}" if x is not None else " " * (width - 1) + "-"


def cached(path: Path, compute, use_cache: bool = True) -> dict:
    """One cell of a resumable benchmark: read from ``path`` when there (and ``use_cache``), else
    ``compute()`` and, when ``use_cache``, write it there. Delete the file to rerun the cell."""
    if use_cache and path.exists():
        print(f"(cached: {path})")
        return json.loads(path.read_text())
    cell = compute()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell, indent=1))
    return cell


def write_json(path, name: str, payload: dict, **extra) -> dict:
    """Write a benchmark's JSON to ``path`` with what it ran on (date, machine, torch, threads,
    ``uptime``); returns the written dict."""
    import torch

    res = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "uptime": uptime(),
           **extra, **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return res
