"""Start the dashboard as a child process (``chrono dashboard``, ``make demo``).

``serve(root, port, host)`` launches ``streamlit run dashboard/streamlit_app.py``
with ``$CHRONO_ROOT`` pointing at the store and returns the ``Popen`` once
the server answers its health check, so callers can print a URL that works.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().with_name("streamlit_app.py")
DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
PRIMARY_COLOR = "#4c78a8"


class ServeError(RuntimeError):
    """The dashboard could not be started (port taken, server exited); one readable line."""


def url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}"


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port on ``host`` the system reports free now (bind to port 0 and read it back)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> list[str]:
    """The ``streamlit run`` command line (the store comes from ``$CHRONO_ROOT``)."""
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.port", str(port), "--server.address", host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--server.runOnSave", "false",
            "--global.developmentMode", "false", "--client.toolbarMode", "viewer",
            # widgets in blue: red and orange mean alerts on every page
            "--theme.primaryColor", PRIMARY_COLOR]


def serve(root, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, wait: bool = True,
          timeout: float = 60.0, log_file=None) -> subprocess.Popen:
    """Start the dashboard on ``host:port`` reading the store at ``root``.

    Returns the running process (stop it with ``.terminate()``); its ``port``
    attribute is the port served (``port=0``: one the system picked as free). With
    ``wait`` the call returns only once ``/_stcore/health`` answers ``ok``.
    ``log_file``: a path for the server's output (default: inherit ours).
    """
    if port == 0:
        port = free_port(host)
    if not port_free(host, port):
        raise ServeError(f"port {port} on {host} is already in use; pick another with --port")
    env = dict(os.environ, CHRONO_ROOT=str(Path(root).absolute()))
    out = open(log_file, "ab") if log_file else None
    try:
        proc = subprocess.Popen(command(port, host), env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL)
    finally:
        if out:
            out.close()
    proc.port = port
    if wait:
        try:
            wait_ready(proc, host, port, timeout)
        except BaseException:
            stop(proc)
            raise
    return proc


def wait_ready(proc: subprocess.Popen, host: str, port: int, timeout: float = 60.0) -> None:
    """Poll the health endpoint until it answers, the process exits, or ``timeout`` passes."""
    health = url(host, port) + "/_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"the dashboard server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)  # the server is starting; nothing to wait on but the socket
    raise ServeError(f"the dashboard did not answer at {health} within {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate the server (then kill it if it does not exit)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
