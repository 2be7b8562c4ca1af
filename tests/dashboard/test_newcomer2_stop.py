"""newcomer2: `chrono dashboard` stopped (SIGTERM) while it starts leaves no server behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)   # polling another process's state: nothing to block on
    return False


def _terminate_and_check_child(proc, start_timeout: float) -> None:
    """SIGTERM ``proc`` once its (streamlit) child exists; the child must be gone after it."""
    child = None
    try:
        assert _until(lambda: _children(proc.pid), start_timeout), "no dashboard server started"
        (child,) = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert _until(lambda: not _alive(child), 30), "the dashboard server outlived chrono"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_sigterm_during_start_up_stops_the_streamlit_child(tmp_path):
    # The SIGTERM handler was installed only once the server answered: a `kill` (or a `timeout`)
    # during the seconds of start-up ended chrono and left the streamlit server running,
    # holding the port, with no parent to stop it.
    (tmp_path / "store").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "chrono_cli", "--root", str(tmp_path / "store"),
                             "dashboard", "--port", str(free_port())], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _terminate_and_check_child(proc, start_timeout=60)   # still starting: no health answer yet


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_sigterm_stops_the_demo_and_its_dashboard(tmp_path, when):
    # the demo installed its SIGTERM handler after both servers had started
    proc = subprocess.Popen([sys.executable, "-m", "chrono_cli", "--root", str(tmp_path / "store"), "demo",
                             "--model-steps", "0", "--steps", "20"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if when == "serving":
        while "press Ctrl-C to stop" not in proc.stdout.readline():
            assert proc.poll() is None, "the demo ended before serving"
    _terminate_and_check_child(proc, start_timeout=120)
