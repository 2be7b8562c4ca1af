"""Stackable method wraps: moved to ``chrono.hooks`` (one hook registry for probes and actuators).

Kept so that ``from probes.wrap import MethodHook`` (adapters, users) still works.
"""
from chrono.hooks import MethodHook

__all__ = ["MethodHook"]
