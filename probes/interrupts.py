"""Hold one Ctrl-C while detach takes the last window, so its counts are not lost.

``held_sigint()`` is a context manager: inside it, in the main thread and while Python's
own SIGINT handler is installed, the first SIGINT is recorded instead of raising
KeyboardInterrupt in the middle of the block, and Python's handler is put back at once, so
a second Ctrl-C raises immediately (a close waiting on a stalled disk stays interruptible).
The caller raises KeyboardInterrupt after the block when ``got`` is true. Anywhere else (a
thread, a handler of the application's own) it changes nothing.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger("probes")


@contextlib.contextmanager
def held_sigint():
    """Yields a list that holds True once a Ctrl-C arrived during the block."""
    got: list[bool] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield got
        return

    def hold(signum, frame):
        got.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)   # the next one raises
        log.warning("probes: Ctrl-C: writing the last window first (Ctrl-C again to stop now)")

    signal.signal(signal.SIGINT, hold)
    try:
        yield got
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, signal.default_int_handler)
