"""chrono.lifecycle: the policy's proposals and the apply/log protocol."""
from __future__ import annotations

import numpy as np
import pytest

import chrono
from chrono.lifecycle import (LifecycleConfig, LifecycleModel, LifecyclePolicy, Proposal,
                              apply_proposals, record_event)
from chrono.snapshots import layer_rows


def rows_for(counts: dict[int, list[int]]):
    return layer_rows("r", 0, 9, {l: np.array(c) for l, c in counts.items()})


def propose(policy, counts, **kw):
    c = {l: np.array(v) for l, v in counts.items()}
    return policy.propose(rows_for(counts), c, **kw)


def test_prune_waits_for_patience_and_respects_min_experts():
    pol = LifecyclePolicy(LifecycleConfig(min_experts=2, patience=2, enable=("prune",)))
    counts = {0: [500, 500, 0, 2]}
    assert propose(pol, counts) == []                      # first low snapshot
    (p,) = propose(pol, counts)                            # second: expert 2 (share 0) first
    assert (p.event, p.layer, p.expert) == ("prune", 0, 2)
    pol2 = LifecyclePolicy(LifecycleConfig(min_experts=2, patience=1, enable=("prune",)))
    assert propose(pol2, {0: [900, 0]}) == []              # would leave 1 < min_experts


def test_low_streak_resets_when_expert_recovers():
    pol = LifecyclePolicy(LifecycleConfig(patience=2, enable=("prune",)))
    assert propose(pol, {0: [500, 500, 1]}) == []
    assert propose(pol, {0: [500, 500, 300]}) == []        # recovered: streak back to 0
    assert propose(pol, {0: [500, 500, 1]}) == []


def test_merge_two_underused():
    pol = LifecyclePolicy(LifecycleConfig(merge_share_factor=0.25, enable=("merge",)))
    (p,) = propose(pol, {3: [450, 450, 40, 60]})           # shares .04 .06 < .25/4
    assert (p.event, p.layer, p.expert, p.source_expert) == ("merge", 3, 2, 3)
    assert propose(LifecyclePolicy(LifecycleConfig(enable=("merge",))), {0: [250, 250, 250, 250]}) == []


def test_split_overloaded_or_clone():
    (p,) = propose(LifecyclePolicy(LifecycleConfig(overload_factor=2.0, enable=("split",))),
                   {0: [700, 100, 100, 100]})
    assert (p.event, p.expert, p.source_expert) == ("split", 0, 0)
    (c,) = propose(LifecyclePolicy(LifecycleConfig(overload_factor=2.0, split_overloaded=False,
                                                   enable=("clone",))), {0: [100, 700, 100, 100]})
    assert (c.event, c.expert) == ("clone", 1)
    full = LifecyclePolicy(LifecycleConfig(max_experts=4, overload_factor=2.0, enable=("split",)))
    assert propose(full, {0: [700, 100, 100, 100]}) == []  # at max_experts


def test_spawn_on_uncertainty_and_on_entropy_rise():
    pol = LifecyclePolicy(LifecycleConfig(spawn_entropy=0.9, enable=("spawn",)))
    assert propose(pol, {0: [300, 300, 400]}, uncertainty={0: 0.5}) == []
    (p,) = propose(pol, {0: [300, 300, 400]}, uncertainty={0: 0.95})
    assert p.event == "spawn" and p.expert == -1
    rise = LifecyclePolicy(LifecycleConfig(spawn_entropy_rise=0.3, enable=("spawn",)))
    assert propose(rise, {0: [980, 10, 10]}) == []         # no history yet
    (q,) = propose(rise, {0: [340, 330, 330]})
    assert q.event == "spawn" and "rose" in q.reason


def test_idle_window_and_global_row_are_ignored():
    pol = LifecyclePolicy(LifecycleConfig(patience=1, enable=("prune",)))
    assert propose(pol, {0: [0, 0, 0]}) == []


def test_cooldown_after_applied():
    pol = LifecyclePolicy(LifecycleConfig(overload_factor=2.0, cooldown=2, enable=("split",)))
    counts = {0: [700, 100, 100, 100]}
    assert len(propose(pol, counts)) == 1
    pol.applied(0)
    assert propose(pol, counts) == [] and propose(pol, counts) == []
    assert len(propose(pol, counts)) == 1


def test_config_and_proposal_validation():
    with pytest.raises(ValueError, match="unknown lifecycle events"):
        LifecycleConfig(enable=("explode",))
    with pytest.raises(ValueError, match="unknown lifecycle event"):
        Proposal("explode", 0, 1)
    with pytest.raises(ValueError):
        LifecycleConfig(min_experts=5, max_experts=2)


class ListModel:
    """A toy LifecycleModel: experts are list entries."""

    def __init__(self, n):
        self.experts = {0: list(range(n))}

    def lifecycle_experts(self):
        return {l: len(e) for l, e in self.experts.items()}

    def apply_lifecycle(self, p):
        ex = self.experts[p.layer]
        if p.event == "split":
            ex.append(ex[p.expert])
            return len(ex) - 1
        if p.event == "prune" and len(ex) > 1:
            ex.pop(p.expert)
            return p.expert
        return None  # refuses the rest


def test_apply_proposals_logs_applied_and_refused(store_root):
    m = ListModel(4)
    assert isinstance(m, LifecycleModel)
    props = [Proposal("split", 0, 1, 1, "hot"), Proposal("merge", 0, 2, 3, "cold"),
             Proposal("prune", 0, 0, None, "dead")]
    with chrono.open_run(store_root, "lc") as w:
        rows = apply_proposals(m, props, step=7, writer=w)
        record_event(w, 8, 0, "grow", 3, 4, reason="stage 2")
    assert [(r["event"], r["applied"], r["n_experts_after"]) for r in rows] == [
        ("split", True, 5), ("merge", False, 5), ("prune", True, 4)]
    t = chrono.read(store_root, "lifecycle", run="lc").collect().sort("step")
    assert t["event"].to_list() == ["split", "merge", "prune", "grow"]
    assert t["applied"].to_list() == [True, False, True, True]
    assert t["expert"].to_list()[0] == 4  # the new expert's index
