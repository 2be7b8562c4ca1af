"""In-hook time as thread CPU time: the one mechanism the probe benchmarks share.

On a shared, loaded machine the wall time spent inside a hook includes time the
thread was descheduled; thread CPU time (``time.thread_time``, user + system
time of the calling thread) does not. With ``torch.set_num_threads(1)`` all
hook work runs in the training thread, so the in-hook CPU time is the cost of
the hooks themselves.

``HookBracket`` measures it the same way for every recorder: it registers a
forward hook on each router *before* any recorder attaches (it runs first and
reads the clock) and one *after* all of them (it runs last and adds the
elapsed thread CPU time). Everything between the two, i.e. every recorder's
router hook, is timed with one instrument, whoever wrote the hook; hooks that
are installed later than ``close()`` (transformers' own output capture) are
outside the bracket.

usage: python benchmarks/hook_cpu_time.py [probe_overhead.py options]
(kept for old command lines: probe_overhead.py measures thread CPU time itself)
"""
from __future__ import annotations

import time

CLOCK = time.thread_time


class HookBracket:
    """Thread CPU seconds spent in the hooks registered between ``__init__`` and ``close``.

    ``routers``: the router modules (their forward hooks: ``router_seconds``); ``modules``:
    other modules whose forward pre-hooks and forward hooks recorders may use, e.g. the model
    and its decoder stack, where work done once per forward lives (``model_seconds``).
    ``seconds`` is the sum; ``calls`` counts bracketed router calls; ``per_hook`` splits
    ``model_seconds`` by ``"pre|post/<module class>"``. Hooks return None (a returned value would
    replace the router's output).
    """

    def __init__(self, routers, modules=()):
        self.routers, self.modules = list(routers), list(modules)
        self.router_seconds = self.model_seconds = 0.0
        self.per_hook: dict[str, float] = {}
        self.calls = 0
        self._t0 = {}
        self._handles = [r.register_forward_hook(self._start("r")) for r in self.routers]
        for m in self.modules:
            self._handles += [m.register_forward_pre_hook(self._start("pre")),
                              m.register_forward_hook(self._start("post"))]

    @property
    def seconds(self) -> float:
        return self.router_seconds + self.model_seconds

    def _start(self, key):
        def start(module, *_):
            self._t0[key, id(module)] = CLOCK()
            return None
        return start

    def _stop(self, key):
        def stop(module, *_):
            t0 = self._t0.pop((key, id(module)), None)
            if t0 is not None:
                if key == "r":
                    self.router_seconds += CLOCK() - t0
                    self.calls += 1
                else:
                    dt = CLOCK() - t0
                    self.model_seconds += dt
                    name = f"{key}/{type(module).__name__}"
                    self.per_hook[name] = self.per_hook.get(name, 0.0) + dt
            return None
        return stop

    def close(self) -> None:
        """Register the closing hooks: call after every recorder under test has attached."""
        self._handles += [r.register_forward_hook(self._stop("r")) for r in self.routers]
        for m in self.modules:
            self._handles += [m.register_forward_pre_hook(self._stop("pre")),
                              m.register_forward_hook(self._stop("post"), always_call=True)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


if __name__ == "__main__":
    import runpy
    import sys
    from pathlib import Path

    sys.argv = ["probe_overhead.py"] + sys.argv[1:]
    runpy.run_path(str(Path(__file__).resolve().parent / "probe_overhead.py"), run_name="__main__")
