"""Token sampling of staged router calls runs at the flush (``Stage._sample``), in call order,
from the values the call is counted from: the stored rows must equal those of the same run with
every call counted and sampled at once (``attach(staging=False)``), and a staged call that is
not counted (its indices changed in place before the flush: a fault) is not sampled either.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chrono
import probe_models as T
import probes
from probes import staging, window

from . import staging_review as R
from . import test_staging as S

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

COLUMNS = "step, mode, layer, batch_idx, position, k, expert, weight, token_id"


def _train(m, steps=3):
    m.train()
    ids = torch.randint(1, T.VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        m(input_ids=ids, labels=ids).loss.backward()
        m.zero_grad(set_to_none=True)
        yield


def _eval(m, steps=3):
    m.eval()
    for s in range(steps):
        with torch.no_grad():
            m(input_ids=torch.randint(1, T.VOCAB, (2, 9), generator=torch.Generator().manual_seed(s)))
        yield


def _infer(m, steps=3):   # 10 routers: inference calls are staged as copies
    for s in range(steps):
        with torch.inference_mode():
            m(torch.randint(1, T.VOCAB, (3, 7), generator=torch.Generator().manual_seed(s)))
        yield


SCENARIOS = {
    "training_grad": (T.mixtral, _train),
    "eval_no_grad": (T.mixtral, _eval),
    "inference_copies": (lambda: R.MoE([R.Router() for _ in range(10)]), _infer),
}


def _record(monkeypatch, root, run, scenario, rate, staging_on: bool):
    """Stored rows, every sampled row before the writer's filter (sorted) and how many calls
    were sampled at a flush."""
    build, work = SCENARIOS[scenario]
    at_flush, sampled, orig_sample, orig_rows = [], [], staging.Stage._sample, window.token_rows
    with monkeypatch.context() as mp:
        mp.setattr(staging.Stage, "_sample", lambda self, *a: at_flush.append(1) or orig_sample(self, *a))
        mp.setattr(window, "token_rows", lambda ready: sampled.append(orig_rows(ready)) or sampled[-1])
        m = build()
        with probes.attach(m, run=run, root=root, tokens=rate, seed=3, steps="manual", flush_every=2,
                           staging=staging_on) as h:
            for _ in work(m):
                h.step()
    ints = np.concatenate([s[0] for s in sampled if s is not None])
    rows = chrono.connect(root).execute(
        f"SELECT {COLUMNS} FROM tokens WHERE run_id = ? ORDER BY ALL", [run]).fetchall()
    return rows, ints[np.lexsort(ints.T[::-1])], len(at_flush)


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
@pytest.mark.parametrize("rate", [0.3, 1.0])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_staged_calls_sampled_at_the_flush_store_the_rows_of_sampling_at_once(store_root, monkeypatch,
                                                                               scenario, rate):
    rows, ints, at_flush = _record(monkeypatch, store_root, "staged", scenario, rate, True)
    rows_once, ints_once, at_flush_once = _record(monkeypatch, store_root, "once", scenario, rate, False)
    assert at_flush > 0 and at_flush_once == 0   # each run sampled where it is named after
    assert rows and rows == rows_once
    np.testing.assert_array_equal(ints, ints_once)


def test_a_staged_call_changed_in_place_is_neither_counted_nor_sampled(store_root):
    """Steps 0-1: the routers are watched, then staged. From step 2 the model changes every
    router's indices in place after it returned: each such call is a fault, not counted, and
    not sampled (its values are no longer the router's); the routers then count and sample at
    once, so from step 3 on every call is counted and sampled again."""
    model = S.MoE(mutate="indices")
    with probes.attach(model, run="chg", root=store_root, tokens=1.0, steps="manual", flush_every=1) as h:
        for s in range(5):
            model.mutate_now = s >= 2
            with torch.no_grad():
                model(torch.randint(1, T.VOCAB, (2, 6), generator=torch.Generator().manual_seed(s)))
            h.step()
        states, faults = list(h._window.rec.stage.state), h.stats()["faults"]
    con = chrono.connect(store_root)
    tokens = dict(con.execute("SELECT step, count(*) FROM tokens WHERE run_id = 'chg' GROUP BY step").fetchall())
    counted = dict(con.execute("SELECT step, sum(tokens) FROM routing WHERE run_id = 'chg' GROUP BY step").fetchall())
    per_step = 2 * 6 * S.K * S.L   # tokens x top-k x layers
    assert states == [staging.EAGER] * S.L and faults == S.L
    assert counted.get(2, 0) == 0 and tokens.get(2, 0) == 0   # step 2: every call dropped, unsampled
    for s in (0, 1, 3, 4):
        assert counted[s] == per_step and tokens[s] == per_step, s
