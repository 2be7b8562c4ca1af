"""Wrapping a method on one module instance so that wrappers stack and unwind in any order.

Used by adapters whose router module does not return the routing decision
itself (DBRX: the parent's ``route_tokens_to_experts``). Rules:

* the wrapper calls whatever the attribute resolved to when it was installed
  (a user's own per-instance patch, another handle's wrapper), never the class
  function behind their back;
* ``remove()`` of the top wrapper restores exactly what it found (the
  instance attribute, or no instance attribute at all), skipping wrappers below
  it that were already removed;
* ``remove()`` of a wrapper that something else has wrapped since only turns
  it into a pass-through (it stops recording); the outer wrapper unwinds past it
  when it is removed.
"""
from __future__ import annotations

_MISSING = object()


class MethodHook:
    def __init__(self, owner, attr: str, on_call):
        """Wrap ``owner.attr``; ``on_call(result, args, kwargs)`` runs after each call while active."""
        self.owner, self.attr = owner, attr
        self.found = owner.__dict__.get(attr, _MISSING)
        self.active = True
        hook = self

        def wrapper(*args, **kwargs):
            inner = hook.found if hook.found is not _MISSING else getattr(type(owner), attr).__get__(owner)
            out = inner(*args, **kwargs)
            if hook.active:
                on_call(out, args, kwargs)
            return out

        wrapper.__chrono_method_hook__ = self
        self.wrapper = wrapper
        owner.__dict__[attr] = wrapper

    def remove(self) -> None:
        self.active = False
        if self.owner.__dict__.get(self.attr, _MISSING) is not self.wrapper:
            return   # wrapped again since: stay as a pass-through until the outer one unwinds
        found = self.found
        while found is not _MISSING:
            below = getattr(found, "__chrono_method_hook__", None)
            if below is None or below.active:
                break
            found = below.found
        if found is _MISSING:
            self.owner.__dict__.pop(self.attr, None)
        else:
            self.owner.__dict__[self.attr] = found
