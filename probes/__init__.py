"""probes: attach to any MoE model with one call and record where every token goes.

    import probes
    with probes.attach(model, run="exp1", root="chrono_runs") as h:
        ...training loop...; h.step()
"""
from __future__ import annotations

from .adapters import Adapter, register, registered
from .api import attach
from .discovery import RouterSite, RouterSpec, find_sites
from .handle import Handle
from .routing import ProbeError, Routed

__all__ = ["attach", "Handle", "RouterSpec", "RouterSite", "ProbeError", "Routed", "Adapter",
           "register", "registered", "find_sites"]
