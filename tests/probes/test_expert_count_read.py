"""The expert count a router hook reads per call (``RouterSite.count_key`` / ``experts_of``):
one dict lookup for a plain int attribute, the adapter's full reading otherwise, and counts
exact whichever way the count is held while it grows in mid-forward. Ground truth: the
review harness's own hooks (``staging_review.truth_hooks``)."""
from __future__ import annotations

import pytest
import torch

from probes import adapters as A
from probes import staging
from probes.discovery import find_sites

from .staging_review import MoE, Router, diff, run


class PropRouter(Router):
    """The expert count is a class property (no instance attribute to read)."""

    @property
    def n_experts(self):
        return self._n

    @n_experts.setter
    def n_experts(self, n):
        self._n = n


class Count(int):
    """An int subclass (as some configs hold counts): read by the adapter's full reading."""


class CountRouter(Router):
    def __setattr__(self, name, value):
        super().__setattr__(name, Count(value) if name == "n_experts" and type(value) is int else value)


class RenamedRouter(Router):
    """Grows by dropping ``n_experts`` and declaring ``num_experts`` (the next name read)."""


def _set(r, n):
    if isinstance(r, RenamedRouter) and n != 8:
        r.__dict__.pop("n_experts", None)
        r.num_experts = n
    else:
        r.n_experts = n
    r.width = n


@pytest.mark.parametrize("cls", [Router, PropRouter, CountRouter, RenamedRouter],
                         ids=["attribute", "property", "int_subclass", "renamed"])
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.enable_grad, torch.inference_mode],
                         ids=["no_grad", "grad", "inference"])
def test_growth_in_mid_forward_is_counted_exactly_whichever_way_the_count_is_held(store_root, cls, ctx):
    """Router 1 is called twice per forward; at step 3 it grows 8 -> 40 between its calls (the
    second routes past the recorder's capacity) and is back to 8 after them."""
    model = MoE([Router(), cls(), Router()] + [Router() for _ in range(6)], order=[0, 1, 1, 2, 3, 4, 5, 6, 7, 8])
    r = model.routers[1]
    state = {"step": 0}

    def after(pos, i):
        if state["step"] == 3 and i == 1:
            _set(r, 40 if pos == 1 else 8)

    model.after = after

    def before(s, h):
        state["step"] = s
    truth, got, stats, states = run(model, store_root, "grow", ctx=ctx, before=before)
    assert max(e for (layer, e) in truth[3] if layer == 1) >= 8
    assert diff(truth, got) == [], diff(truth, got)[:4]
    assert stats["invalid_indices"] == 0 and stats["faults"] == 0
    if ctx is not torch.inference_mode:
        assert states == [staging.STAGED] * 9


def test_count_key_is_the_plain_int_attribute_the_default_reading_takes():
    r = Router()
    assert A.count_key(r) == "n_experts"
    assert A.count_key(PropRouter()) is None          # a property: nothing in the instance dict
    c = CountRouter()
    assert type(c.n_experts) is Count and A.count_key(c) is None
    r2 = Router()
    r2.n_experts = True                                # a bool is not a count: the next name is
    r2.num_experts = 6
    assert A.count_key(r2) == "num_experts" and A.default_n_experts(r2) == 6
    lin = torch.nn.Linear(4, 5)
    assert A.count_key(lin) == "out_features"
    assert A.count_key(torch.nn.Module()) is None


def test_experts_of_reads_the_key_while_it_holds_an_int_then_the_full_reading():
    model = MoE([Router(), Router()])
    site = find_sites(model)[0]
    r = site.module
    assert site.count_key == "n_experts" and site.experts_of(r) == 8
    r.n_experts = 12                                   # lifecycle growth: read fresh each call
    assert site.experts_of(r) == 12
    del r.n_experts                                    # gone: the full reading finds the next name
    r.num_experts = 5
    assert site.experts_of(r) == 5 == A.default_n_experts(r)
    del r.num_experts
    with pytest.raises(ValueError, match="expert count"):
        site.experts_of(r)
    # documented: while the key holds an int it is what is read, even if a name the full reading
    # would prefer appears later (the attribute a router keeps its count in does not move)
    r.num_experts = 9
    site.count_key = "num_experts"   # (as discovery resolves it for a router that holds num_experts)
    r.n_experts = 4
    assert site.experts_of(r) == 9 and A.default_n_experts(r) == 4
