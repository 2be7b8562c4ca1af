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
  when it is removed;
* ``copy.deepcopy`` of the model gives the copy the method it would have
  without us (the wrapper would otherwise call the original's method and record
  into the original's run).
"""
from __future__ import annotations

import copy

_MISSING = object()


class _Wrapper:
    """The callable put on the instance; a deep copy of the model gets the unwrapped method."""

    def __init__(self, hook: "MethodHook"):
        self.hook = hook
        self.__chrono_method_hook__ = hook

    def __call__(self, *args, **kwargs):
        hook = self.hook
        inner = hook.found if hook.found is not _MISSING else \
            getattr(type(hook.owner), hook.attr).__get__(hook.owner)
        out = inner(*args, **kwargs)
        if hook.active:
            hook.on_call(out, args, kwargs)
        return out

    def __deepcopy__(self, memo):
        hook = self.hook
        if hook.found is not _MISSING:
            return copy.deepcopy(hook.found, memo)
        twin = memo.get(id(hook.owner))
        if twin is None:      # not copied as part of its owner: a plain copy of the class method
            return getattr(type(hook.owner), hook.attr).__get__(hook.owner)
        return getattr(type(twin), hook.attr).__get__(twin)


class MethodHook:
    def __init__(self, owner, attr: str, on_call):
        """Wrap ``owner.attr``; ``on_call(result, args, kwargs)`` runs after each call while active."""
        self.owner, self.attr, self.on_call = owner, attr, on_call
        self.found = owner.__dict__.get(attr, _MISSING)
        self.active = True
        self.wrapper = _Wrapper(self)
        owner.__dict__[attr] = self.wrapper

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
