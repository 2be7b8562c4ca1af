"""The router hook's hot path (``Stage.push``) and the flush's per-forward work.

A staged router's call only reads the router's expert count and stages a reference in the
hook; the flush computes all calls' logit sums in one op when there are at least 8 and their
logits share a shape and dtype. Ground truth: the test's own forward hook, registered before
probes attach, clones each router output as it returns, counted with NumPy. Cases: a staged
router whose expert count grows past the recorder's capacity; an expert count that cannot be
read; a router output that stops parsing after probation (one fault per call,
the forward unharmed); logits of mixed dtypes and of 3-D shape, with a non-finite one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chrono
import probes
from probes import staging

from . import probe_models as T

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

K, D = 2, 8


class Router(torch.nn.Module):
    """``n_experts`` may grow (the projection is as wide as the largest count); logits can be
    returned as ``[B, S, E]`` (``three_d``) or in another dtype; ``broken`` returns a 5-tuple
    (no adapter parses it); ``poison`` makes the logits non-finite (weights stay finite)."""
    chrono_router = True

    def __init__(self, n=5, widest=48, dtype=None, three_d=False):
        super().__init__()
        self.proj = torch.nn.Linear(D, widest)
        self.n_experts, self.width, self.top_k = n, n, K   # declared count, count routed to
        self.dtype, self.three_d, self.broken, self.poison, self.big = dtype, three_d, False, False, False

    def forward(self, x):
        logits = self.proj(x)[..., : self.width]
        if self.poison:
            logits = logits + float("inf")
        w, idx = torch.topk(logits.softmax(-1), K, dim=-1)
        if self.poison:
            w = torch.full_like(w, 0.5)
        out_logits = logits if self.dtype is None else logits.to(self.dtype)
        if self.big:   # finite, ~1e37 each: 42 of them sum past float32's 3.4e38
            out_logits = (out_logits.abs() + 1.0) * 1e37
        if self.three_d:
            out_logits = out_logits.reshape(x.shape[0] // 7, 7, -1)
        if self.broken:
            return out_logits, w, idx, None, None
        return out_logits, w, idx


class MoE(torch.nn.Module):
    def __init__(self, routers):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(T.VOCAB, D)
        self.routers = torch.nn.ModuleList(routers)
        self.table = torch.nn.Parameter(torch.randn(48, D) * 0.1)
        self.rewrite = False   # True: after each router, overwrite its indices and weights in place

    def forward(self, input_ids):
        x = self.emb(input_ids).reshape(-1, D)
        for r in self.routers:
            out = r(x)
            w, idx = out[1], out[2]
            if self.rewrite:   # as a block that normalises weights in place would
                w.mul_(0.5)
                idx.fill_(0)
            x = x + (w[..., None] * self.table[idx]).sum(1)
        return x.sum()


def run(model, root, run_id, steps, before=None, grad=False, infer=False):
    """Per step, the truth [(layer, indices)] and the stored {(layer, expert): tokens}; forwards
    in training (``grad``), under ``inference_mode`` (``infer``) or else under ``no_grad``."""
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: calls.append((i, out[2].detach().clone())))
    ids = torch.randint(1, T.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    truth, outs = [], []
    with probes.attach(model, run=run_id, root=root, steps="manual", flush_every=2) as h:
        for s in range(steps):
            if before is not None:
                before(s)
            del calls[:]
            if grad:
                out = model(ids)
                out.backward()
            else:
                with torch.inference_mode() if infer else torch.no_grad():
                    out = model(ids)
            outs.append(float(out))
            want: dict = {}
            for layer, idx in calls:
                for e, n in zip(*np.unique(idx.reshape(-1).numpy(), return_counts=True)):
                    want[layer, int(e)] = want.get((layer, int(e)), 0) + int(n)
            truth.append(want)
            h.step()
        states, stats, capacity = list(h._window.rec.stage.state), h.stats(), h._window.rec.capacity
    got: dict = {}
    for step, layer, e, n in chrono.connect(root).execute(
            "select step, layer, expert, tokens from routing where run_id = ? and tokens > 0", [run_id]).fetchall():
        got.setdefault(step, {})[layer, e] = n
    return truth, got, states, stats, capacity, outs


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "train"])
def test_a_staged_router_growing_past_the_capacity_is_widened_at_the_flush(store_root, grad):
    model = MoE([Router(), Router()])

    def before(s):
        if s == 3:
            model.routers[1].n_experts = model.routers[1].width = 40   # lifecycle growth, once staged

    truth, got, states, stats, capacity, _ = run(model, store_root, "grow", 6, before, grad)
    assert states == [staging.STAGED] * 2 and stats["faults"] == 0
    assert capacity >= 40
    assert max(e for (layer, e) in truth[5] if layer == 1) >= 5   # experts beyond the old count were routed to
    assert [got.get(s, {}) for s in range(6)] == truth


def test_an_expert_count_unreadable_on_the_hot_path_is_one_fault_and_the_forward_runs(store_root):
    """As on the general path: that call is not counted (its experts are unknown), the fault is
    reported once, the other router's call and the later steps are exact."""
    model = MoE([Router(), Router()])

    def before(s):   # at step 2 not an int: the count cannot be read
        model.routers[0].n_experts = "five" if s == 2 else 5

    truth, got, states, stats, _, _ = run(model, store_root, "unread", 4, before)
    assert states == [staging.STAGED] * 2
    assert stats["faults"] == 1
    want = [{key: n for key, n in t.items() if s != 2 or key[0] == 1} for s, t in enumerate(truth)]
    assert [got.get(s, {}) for s in range(4)] == want


def test_a_router_output_that_stops_parsing_is_one_fault_per_call_and_the_forward_runs(store_root):
    plain = MoE([Router(), Router()])
    model = MoE([Router(), Router()])
    model.load_state_dict(plain.state_dict())

    def before(s):
        model.routers[1].broken = s >= 2
        plain.routers[1].broken = s >= 2

    truth, got, states, stats, _, outs = run(model, store_root, "broken", 4, before)
    ids = torch.randint(1, T.VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert outs == [float(plain(ids))] * 4   # the forward never saw the fault
    assert stats["faults"] == 2   # steps 2 and 3, router 1: one each, not two
    for s in range(4):
        want = {key: n for key, n in truth[s].items() if s < 2 or key[0] == 0}
        assert got.get(s, {}) == want


@pytest.mark.parametrize("dtypes", [(None, None, None), (torch.bfloat16, None, torch.float16)],
                         ids=["one_dtype", "mixed_dtypes"])
@pytest.mark.parametrize("many", [False, True], ids=["3_routers", "10_routers"])
def test_logit_sums_of_one_flush_flag_exactly_the_nonfinite_router(store_root, dtypes, many):
    """From 8 calls whose logits share shape and dtype: one sum for all calls; fewer, mixed
    dtypes or a 3-D logits tensor: one sum per call. Either way only the poisoned router of
    step 3 is flagged."""
    routers = [Router(dtype=dtypes[0]), Router(dtype=dtypes[1], three_d=not many), Router(dtype=dtypes[2])]
    model = MoE(routers + ([Router(dtype=dtypes[0]) for _ in range(7)] if many else []))

    def before(s):
        model.routers[2].poison = s == 3

    truth, got, states, stats, _, _ = run(model, store_root, "nf", 5, before)
    assert states == [staging.STAGED] * len(model.routers)
    assert stats["nonfinite"] == 1
    sig = chrono.connect(store_root).sql(
        "select step, layer from signals where name = 'probes.nonfinite' and value > 0").fetchall()
    assert sig == [(3, 2)]
    assert [got.get(s, {}) for s in range(5)] == truth


@pytest.mark.parametrize("n", [3, 8], ids=["one_sum_per_call", "one_sum_for_all"])
def test_finite_logits_whose_float32_sum_overflows_are_flagged_alike_on_every_path(store_root, n):
    """The documented bound of the non-finite check (probes/staging.py): a logit sum is taken
    in float32 at least on every path, so finite logits summing past 3.4e38 are flagged, and
    identically whether counted at once (the probation step), with one sum per call or with
    one sum for all calls: every step of every layer, never a path-dependent answer (signals:
    one per window of 2 steps and layer, valued by its flagged steps)."""
    routers = [Router() for _ in range(n)]
    for r in routers:
        r.big = True
    model = MoE(routers)
    truth, got, states, stats, _, _ = run(model, store_root, "big", 4)
    assert states == [staging.STAGED] * n
    assert [got.get(s, {}) for s in range(4)] == truth
    assert stats["nonfinite"] == 2 * n
    sig = chrono.connect(store_root).sql(
        "select step, layer, value from signals where name = 'probes.nonfinite' order by all").fetchall()
    assert sig == [(s, layer, 2.0) for s in (1, 3) for layer in range(n)]


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
def test_one_sum_for_all_logits_is_used_only_when_they_share_shape_and_dtype(store_root):
    """The flush layout concatenates logits for one sum only when it can and from 8 calls
    (checked on the cached layouts, so this test fails if either branch is never taken)."""
    for name, routers in [("same", [Router() for _ in range(8)]),
                          ("mixed", [Router() for _ in range(7)] + [Router(dtype=torch.bfloat16)]),
                          ("few", [Router() for _ in range(7)])]:
        model = MoE(routers)
        with probes.attach(model, run=name, root=store_root, steps="manual") as h:
            for _ in range(3):
                with torch.no_grad():
                    model(torch.randint(1, T.VOCAB, (3, 7)))
                h.step()
            lbufs = [layout[7] for layout in h._window.rec.stage._layouts.values()]
        assert lbufs and all((b is not None) == (name == "same") for b in lbufs), name


@pytest.mark.parametrize("option, match", [({"staging": "no"}, "staging must be True"),
                                           ({"padding": "drop"}, "padding must be"),
                                           ({"flush_every": 0}, "flush_every must be"),
                                           ({"flush_every": True}, "flush_every must be"),
                                           ({"tokens": "0.05"}, "tokens must be"),
                                           ({"tokens": True}, "tokens must be"),
                                           ({"tokens": 1.5}, "tokens must be"),
                                           ({"max_tokens_per_step": 1.5}, "max_tokens_per_step must be"),
                                           ({"max_tokens_per_step": 0}, "max_tokens_per_step must be"),
                                           ({"seed": "a"}, "seed must be an int"),
                                           ({"start_step": -1}, "start_step must be"),
                                           ({"metrics_port": "abc"}, "metrics_port must be"),
                                           ({"metrics_port": 70000}, "metrics_port must be"),
                                           ({"metrics_port": True}, "metrics_port must be")])
def test_bad_attach_options_are_refused_before_anything_is_hooked_or_written(store_root, option, match):
    model = MoE([Router(), Router()])
    with pytest.raises(probes.ProbeError, match=match):
        probes.attach(model, run="bad", root=store_root, **option)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not (store_root / "bad").exists() and not any(store_root.glob("**/*.parquet"))


def test_a_call_the_hot_path_hands_over_is_parsed_once(store_root):
    """A staged router starts returning capacity drops (the hot path cannot stage them and hands
    the call to the general path): its output is parsed once per call, and counted exactly."""
    model = MoE([Router(), Router()])
    r = model.routers[1]
    forward = r.forward

    def with_drops(x):
        logits, w, idx = forward(x)
        return logits, w, idx, (torch.zeros(idx.shape, dtype=torch.bool) if r.drops else None)

    r.forward, r.drops = with_drops, False
    calls = {"n": 0}
    from probes.discovery import _native_parse

    def counting_parse(module, args, output):
        calls["n"] += module is r
        return _native_parse(module, args, output)

    def before(s):
        r.drops = s >= 2
        if s == 2:
            calls["n"] = 0
    import probes.discovery as discovery
    orig = discovery._native_parse
    discovery._native_parse = counting_parse
    try:
        truth, got, states, stats, _, _ = run(model, store_root, "handover", 4, before)
    finally:
        discovery._native_parse = orig
    assert calls["n"] == 2   # steps 2 and 3: one parse each
    assert stats["faults"] == 0 and [got.get(s, {}) for s in range(4)] == truth


@pytest.mark.parametrize("ctx", [torch.enable_grad, torch.no_grad, torch.inference_mode],
                         ids=["train", "no_grad", "inference"])
def test_counting_never_joins_the_autograd_graph(store_root, ctx):
    """Counting switches grad mode off only when it is on (``grad_off``): whatever the mode,
    the recorder's buffers never require grad nor carry a ``grad_fn`` (in training, a copy of
    the router's weights into them would otherwise join the graph), through probation (counted
    at once) and staged forwards, and counts stay exact."""
    model = MoE([Router(), Router()])
    truth, got, _, _, _, _ = run(model, store_root, "grad", 4, grad=ctx is torch.enable_grad,
                                 infer=ctx is torch.inference_mode)
    assert [got.get(s, {}) for s in range(len(truth))] == truth
    with probes.attach(model, run="grad2", root=store_root, steps="manual") as h:
        for _ in range(3):
            with ctx():
                out = model(torch.randint(1, T.VOCAB, (3, 7)))
            if ctx is torch.enable_grad:
                out.backward()
            rec = h._window.rec
            for t in (rec.acc, rec.win, rec.tw_cells):
                assert not t.requires_grad and t.grad_fn is None
            h.step()


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
@pytest.mark.parametrize("n_routers", [staging.COPIES_MIN_ROUTERS, staging.COPIES_MIN_ROUTERS - 1],
                         ids=["copies_staged", "counted_at_once"])
def test_inference_calls_are_counted_as_returned_before_the_model_changes_them(store_root, monkeypatch,
                                                                             n_routers):
    """Under ``inference_mode`` outputs have no version counter: from ``COPIES_MIN_ROUTERS``
    routers each call stages private copies, with fewer it is counted at once. Either way the
    counts are the router's outputs as returned (the test's own hook clones them), not the
    values the model wrote over them after the router, and no fault is reported."""
    copied = []
    copy = staging.Stage._copy
    monkeypatch.setattr(staging.Stage, "_copy", lambda self, *a: copied.append(copy(self, *a)) or copied[-1])
    model = MoE([Router() for _ in range(n_routers)])
    model.rewrite = True
    truth, got, _, stats, _, _ = run(model, store_root, "inplace", 4, infer=True)
    assert any(e != 0 for t in truth for (_, e) in t)   # the rewrite (all to expert 0) would show
    assert [got.get(s, {}) for s in range(4)] == truth
    assert stats["faults"] == 0
    assert copied == ([True] * (4 * n_routers) if n_routers >= staging.COPIES_MIN_ROUTERS else [])   # the way
