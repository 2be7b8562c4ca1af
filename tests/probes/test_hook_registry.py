"""chrono.hooks.HookRegistry: the one registry probes and actuators install through (issue 17 item 7)."""
import pytest
import torch
from torch import nn

import probes.wrap
from chrono.hooks import HookRegistry, MethodHook


class _Removable:
    def __init__(self, name, log, fail=False):
        self.name, self.log, self.fail = name, log, fail

    def remove(self):
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(self.name)


def test_removes_last_first_once_and_survives_a_failing_entry():
    log = []
    reg = HookRegistry()
    for name, fail in (("a", False), ("b", True), ("c", False)):
        reg.adopt(_Removable(name, log, fail))
    assert len(reg) == 3
    reg.remove()
    assert log == ["c", "b", "a"]                      # b raised; a was still removed
    assert [str(e) for e in reg.errors] == ["b"]
    reg.remove()
    assert log == ["c", "b", "a"] and len(reg) == 0    # idempotent


def test_a_child_goes_with_its_parent_or_alone():
    log = []
    parent = HookRegistry()
    parent.adopt(_Removable("probes", log))
    child = HookRegistry(parent=parent)
    child.adopt(_Removable("actuator", log))
    parent.adopt(_Removable("later", log))
    child.remove()                                      # an actuator leaving early
    assert log == ["actuator"] and len(parent) == 2     # the parent forgot it
    other = HookRegistry(parent=parent)
    other.adopt(_Removable("other", log))
    parent.remove()                                     # detach: everything, last first
    assert log == ["actuator", "other", "later", "probes"]


def test_torch_hooks_and_method_wraps_leave_the_module_as_found():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    before = lin(x)
    calls = []
    reg = HookRegistry()
    reg.pre(lin, lambda m, args: (args[0] * 2,))
    reg.forward(lin, lambda m, a, out: calls.append("fwd"))
    reg.forward(lin, lambda m, a, out: calls.append("first"), prepend=True)
    reg.wrap(lin, "extra_repr", lambda out, a, k: calls.append("wrap"))
    assert not torch.equal(lin(x), before) and calls == ["first", "fwd"]
    lin.extra_repr()
    assert calls[-1] == "wrap"
    reg.remove()
    assert torch.equal(lin(x), before)
    assert not lin._forward_hooks and not lin._forward_pre_hooks and "extra_repr" not in lin.__dict__


class _Router(nn.Module):
    chrono_router = True

    def __init__(self):
        super().__init__()
        self.n_experts, self.top_k = 4, 1
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        logits = x @ self.weight.t()
        idx = logits.topk(1, -1).indices
        return logits, torch.softmax(logits, -1).gather(-1, idx), idx


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"router": _Router()}) for _ in range(2))

    def forward(self, x):
        return [layer["router"](x)[2] for layer in self.layers]


def test_probes_wrap_is_the_registry_method_hook():
    assert probes.wrap.MethodHook is MethodHook


@pytest.mark.parametrize("with_gov", [False, True])
def test_detach_empties_the_handle_registry(tmp_path, with_gov):
    import chrono
    import probes as P

    model = _Net()
    with P.attach(model, run="reg", root=tmp_path, flush_every=2) as h:
        n_probes = len(h.hooks)
        assert n_probes >= 2 + 2                         # model pre/post + one per router at least
        if with_gov:
            chrono.govern(model, h, actuators=("informed-lens",))
            assert len(h.hooks) == n_probes + 1          # the governor, as one entry
        model(torch.randn(4, 8))
    assert len(h.hooks) == 0 and not h.hooks.errors
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
