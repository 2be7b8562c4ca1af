"""One text corpus: every workload, example and benchmark trains on the same bytes, and those are
the bytes the governance benchmark's cached runs were trained on."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reference_models import corpus

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _independent_bytes() -> bytes:
    """The spec written out: topics in sorted key order, one newline between two, UTF-8."""
    from pydoc_data.topics import topics

    return b"\n".join(topics[k].encode("utf-8") for k in sorted(topics))


def test_corpus_is_the_spec_and_the_governance_bytes():
    data = corpus.pydoc_bytes()
    assert data == _independent_bytes()
    assert corpus.text_bytes().tobytes() == data and corpus.text_bytes().dtype == np.uint8
    if sys.version_info[:3] != (3, 11, 7):
        pytest.skip("the pinned digest is the one of CPython 3.11.7's pydoc topics")
    # the bytes of benchmarks/results/governance_cache (134 cached 600-step runs)
    assert len(data) == 466195
    assert hashlib.sha256(data).hexdigest() == \
        "2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4"


def _governance_workloads():
    """benchmarks/governance_workloads.py loaded by path (no sys.path entry: benchmarks/ holds a
    dashboard.py that would shadow the dashboard package for later tests)."""
    spec = importlib.util.spec_from_file_location("_gw_under_test", BENCH / "governance_workloads.py")
    mod = sys.modules["_gw_under_test"] = importlib.util.module_from_spec(spec)  # dataclasses need it
    spec.loader.exec_module(mod)
    return mod


def test_every_loader_reads_the_same_split():
    W = _governance_workloads()

    from reference_models.var.workload import _text

    data = corpus.pydoc_bytes()
    cut = int(len(data) * 0.9)
    train, val = W.load_text()
    assert train.dtype == torch.long and bytes(train.to(torch.uint8).tolist()) == data[:cut]
    assert bytes(val.to(torch.uint8).tolist()) == data[cut:]
    _, vtrain, vval = _text()
    assert (vtrain, vval) == (data[:cut], data[cut:])
    atrain, aval = corpus.split_bytes(corpus.text_bytes())
    assert atrain.tobytes() == data[:cut] and aval.tobytes() == data[cut:]


def test_byte_batches_are_shifted_windows_of_the_data():
    data = corpus.text_bytes()[:5000]
    (x, y), = corpus.byte_batches(data, block=16, batch=4, seed=3, steps=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = data.tobytes().find(bytes(row_x))
        assert start >= 0 and bytes(row_y) == data.tobytes()[start + 1:start + 17]
    again = corpus.fixed_val_batches(data, 16, 4, 2, seed=3)
    assert torch.equal(again[0][0], x)
