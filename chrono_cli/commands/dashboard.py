"""``chrono dashboard``: serve the Streamlit dashboard over a store (127.0.0.1 by default)."""
from __future__ import annotations

import argparse
import signal
import sys

HELP = ("serve the live dashboard (pages: Runs, Routing, Health, Alerts, Governance, Specialization, "
        "Lifecycle & workloads, SQL)")


def register(sub) -> None:
    p = sub.add_parser(
        "dashboard", help=HELP,
        description="Start the Streamlit dashboard over the store and print its URL. It reads the "
                    "store read-only and refreshes by itself while runs are written. Ctrl-C stops it.")
    p.add_argument("--root", default=argparse.SUPPRESS,
                   help="store root directory (same as the global --root; default $CHRONO_ROOT, else ./chrono_runs)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501; 0: a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else exposes the store to the network)")
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args) -> int:
    from chrono_cli.common import UserError

    if not 0 <= args.port < 65536:
        raise UserError("--port must be between 0 and 65535")
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise UserError("the dashboard needs streamlit: pip install 'streamlit>=1.40'") from None
    from dashboard.server import ServeError, serve, stop, url

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"chrono: warning: binding {args.host} makes the store readable from the network", file=sys.stderr)
    def _terminated(signum, frame):  # `kill PID` stops the server too, not only Ctrl-C
        raise KeyboardInterrupt

    # before the server starts: serve() stops it on any exception while waiting for it to be ready
    signal.signal(signal.SIGTERM, _terminated)
    try:
        proc = serve(args.root, port=args.port, host=args.host)
    except ServeError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:   # Ctrl-C / kill during start-up: the server is stopped already
        return 0
    print(f"chrono dashboard: {url(args.host, proc.port)}  (store {args.root}; Ctrl-C to stop)", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        return 0
