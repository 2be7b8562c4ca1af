"""The expert count a router hook reads per call (``RouterSite.count_key`` / ``experts_of``):
one dict lookup for a plain int attribute, the adapter's full reading otherwise, and counts
exact whichever way the count is held while it grows in mid-forward. Ground truth: the
review harness's own hooks (``staging_review.truth_hooks``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import probes
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


class NumpyRouter(Router):
    """The count as a NumPy integer (a count computed with NumPy, e.g. ``mask.sum()``). Was
    (before review 6 of 125a7c9, and before that change too): skipped by the reading, so
    ``attach`` raised 'cannot tell the expert count', or, taken up after attach, every call of
    the router was a fault and lost (measured: a 6-step run, the count a NumPy int from step 2:
    140 (step, layer, expert) cells differed from the truth, 7 faults)."""

    def __setattr__(self, name, value):
        super().__setattr__(name, np.int64(value) if name == "n_experts" and type(value) is int else value)


class RenamedRouter(Router):
    """Grows by dropping ``n_experts`` and declaring ``num_experts`` (the next name read)."""


def _set(r, n):
    if isinstance(r, RenamedRouter) and n != 8:
        r.__dict__.pop("n_experts", None)
        r.num_experts = n
    else:
        r.n_experts = n
    r.width = n


def _growing(cls, order):
    """A model whose router 1 (a ``cls``; ``max(order) + 1`` routers, called in ``order``) grows
    8 -> 40 between its two calls of step 3 (``state["step"]``, set by the test) and is back to 8
    after them."""
    model = MoE([Router(), cls()] + [Router() for _ in range(max(order) - 1)], order=order)
    r = model.routers[1]
    state = {"step": 0}

    def after(pos, i):
        if state["step"] == 3 and i == 1:
            _set(r, 40 if pos == 1 else 8)

    model.after = after
    return model, r, state


@pytest.mark.parametrize("cls", [Router, PropRouter, CountRouter, NumpyRouter, RenamedRouter],
                         ids=["attribute", "property", "int_subclass", "numpy_int", "renamed"])
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.enable_grad, torch.inference_mode],
                         ids=["no_grad", "grad", "inference"])
def test_growth_in_mid_forward_is_counted_exactly_whichever_way_the_count_is_held(store_root, cls, ctx):
    """Router 1 is called twice per forward; at step 3 it grows 8 -> 40 between its calls (the
    second routes past the recorder's capacity) and is back to 8 after them."""
    model, r, state = _growing(cls, [0, 1, 1, 2, 3, 4, 5, 6, 7, 8])

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
    r3 = Router()
    r3.n_experts, r3.num_experts = np.int64(7), 6     # a NumPy count is read first, as an int
    assert A.count_key(r3) is None and type(A.default_n_experts(r3)) is int and A.default_n_experts(r3) == 7
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
    r.n_experts = np.int64(14)                         # counted with NumPy: the full reading's int
    assert type(site.experts_of(r)) is int and site.experts_of(r) == 14
    r.n_experts = np.float64(15)                       # not a count: the next name is
    r.num_experts = 3
    assert site.experts_of(r) == 3
    del r.num_experts
    r.n_experts = 12
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


def _clone_truth(model) -> list:
    """Like ``staging_review.truth_hooks`` without its host read (``bool(...)`` of a tensor is
    a graph break under torch.compile): (layer, indices, weights float64, True) per call."""
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: calls.append(
            (i, out[2].detach().clone().long(), out[1].detach().clone().double(), True)))
    return calls


@pytest.mark.parametrize("cls", [Router, PropRouter, CountRouter, NumpyRouter, RenamedRouter],
                         ids=["attribute", "property", "int_subclass", "numpy_int", "renamed"])
def test_compiled_growth_in_mid_forward_is_counted_exactly_with_no_graph_break(store_root, cls):
    """The hook's dict read under ``torch.compile`` (whole model): dynamo must see the count
    each call reads (a mutation in mid-forward, a key deleted and another name declared, a
    property, an int subclass, a NumPy integer: traced as a 0-d array there) and guard on it,
    so a later forward with another count is not run with the value traced first; and the read
    must add no graph break. Growth 8 -> 40 in mid-forward at step 3 (back to 8 after it), 44
    from step 4 on, 3 from step 5. (A stale count, read once per hook, fails it: checked.)"""
    from torch._dynamo.utils import counters

    model, r, state = _growing(cls, [0, 1, 1, 2])
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    counters.clear()

    def before(s, h):
        state["step"] = s
        if s in (4, 5):
            _set(r, {4: 44, 5: 3}[s])
    truth, got, stats, _ = run(model, store_root, "cgrow", before=before, call=compiled, hooks=_clone_truth)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert max(e for (layer, e) in truth[3] if layer == 1) >= 8   # the growth was routed to
    assert max(e for (layer, e) in truth[4] if layer == 1) >= 8
    assert diff(truth, got) == [], diff(truth, got)[:4]
    assert stats["invalid_indices"] == 0 and stats["faults"] == 0


def test_every_hf_family_reads_its_count_with_the_dict_lookup_and_it_equals_the_full_reading():
    """Each transformers router the conventions read (``default_n_experts``) holds its count
    as a plain int attribute: discovery resolves ``count_key`` (the one-lookup read is the one
    taken in the hook) and it names what the full reading returns; DBRX (its own reading of
    ``layer.out_features``) has none."""
    from . import probe_models as T

    for family, build in sorted(T.FAMILIES.items()):
        model = build()   # (held: sites hold their routers weakly)
        for site in find_sites(model):
            m = site.module
            if site._n_experts is A.default_n_experts:
                assert site.count_key is not None, (family, site.name)
                assert m.__dict__[site.count_key] == A.default_n_experts(m) == site.n_experts, family
            else:
                assert site.count_key is None and site.n_experts == int(site._n_experts(m, None)), family


def test_a_router_spec_without_n_experts_reads_the_default_way_and_one_with_it_its_own():
    """A ``RouterSpec`` with no ``n_experts`` reads the count as an adapter's default reading
    does (so the one-lookup key applies); one with ``n_experts`` (int or callable) keeps it."""
    model = MoE([Router(), Router()])
    (site, _) = find_sites(model, specs=[probes.RouterSpec("routers.*")])
    assert site.count_key == "n_experts" and site.experts_of(site.module) == 8
    site.module.n_experts = 11
    assert site.experts_of(site.module) == 11
    fixed = find_sites(model, specs=[probes.RouterSpec("routers.*", n_experts=5)])[0]
    assert fixed.count_key is None and fixed.experts_of(fixed.module) == 5
    by_call = find_sites(model, specs=[probes.RouterSpec("routers.*", n_experts=lambda m: m.width + 1)])[0]
    assert by_call.count_key is None and by_call.experts_of(by_call.module) == 9
