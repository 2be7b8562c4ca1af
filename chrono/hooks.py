"""One registry for every hook chrono and probes put on a model, unwound last first.

``HookRegistry`` records what one owner installed: forward hooks, forward pre-hooks,
method wraps (``MethodHook``) and any other object with a ``remove()`` (a child
registry, an actuator that restores a tensor). ``remove()`` takes them away in
reverse order of installation, each exactly once; a failing removal does not stop
the others (it is kept in ``errors``). Registries nest: ``HookRegistry(parent=p)``
is removed with ``p`` but can also be removed alone (an actuator leaving before the
probes handle it was attached with). So ``probes.Handle.detach()`` unwinds the
probes' hooks, and the hooks of every actuator registered under the handle, in one
pass, and leaves the model as found.

``MethodHook`` wraps a method on one module instance so that wrappers stack and unwind
in any order (for routers whose module does not return the routing decision itself,
e.g. DBRX's ``route_tokens_to_experts``):

* the wrapper calls whatever the attribute resolved to when it was installed (a
  user's own per-instance patch, another handle's wrapper), never the class function
  behind their back;
* ``remove()`` of the top wrapper restores exactly what it found (the instance
  attribute, or no instance attribute at all), skipping wrappers below it that were
  already removed;
* ``remove()`` of a wrapper that something else has wrapped since only turns it into
  a pass-through (it stops recording); the outer wrapper unwinds past it when it is removed;
* ``copy.deepcopy`` of the model gives the copy the method it would have without us.

No torch import here: torch handles are used through their ``remove()`` only.
"""
from __future__ import annotations

import copy

_MISSING = object()


class HookRegistry:
    """The hooks one owner installed (see the module docstring). ``len()``: entries still held."""

    def __init__(self, parent: "HookRegistry | None" = None):
        self._entries: list = []
        self.errors: list[BaseException] = []
        self._parent = parent
        if parent is not None:
            parent.adopt(self)

    def forward(self, module, fn, prepend: bool = False, always_call: bool = False):
        """``module.register_forward_hook(fn, ...)``; returns torch's handle."""
        kw = {"always_call": True} if always_call else {}
        return self.adopt(module.register_forward_hook(fn, prepend=prepend, **kw))

    def pre(self, module, fn, prepend: bool = False, with_kwargs: bool = False):
        """``module.register_forward_pre_hook(fn, ...)``; returns torch's handle."""
        return self.adopt(module.register_forward_pre_hook(fn, prepend=prepend, with_kwargs=with_kwargs))

    def wrap(self, owner, attr: str, on_call) -> "MethodHook":
        """Wrap ``owner.attr`` (a ``MethodHook``); ``on_call(result, args, kwargs)`` after each call."""
        return self.adopt(MethodHook(owner, attr, on_call))

    def adopt(self, removable):
        """Take over anything with ``remove()``; returns it."""
        self._entries.append(removable)
        return removable

    def release(self, entry) -> None:
        """Stop tracking ``entry`` without removing it (it was removed by its owner)."""
        self._entries = [e for e in self._entries if e is not entry]

    def remove(self) -> None:
        """Remove everything, last installed first. Idempotent."""
        while self._entries:
            entry = self._entries.pop()
            try:
                entry.remove()
            except Exception as e:   # the rest must still be unwound
                self.errors.append(e)
        if self._parent is not None:
            self._parent.release(self)
            self._parent = None

    def __len__(self) -> int:
        return len(self._entries)


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
