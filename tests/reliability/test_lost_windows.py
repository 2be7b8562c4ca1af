"""A closed window whose rows cannot be built on the background thread (a bug, a corrupt buffer)
is a write error, and its routing and token rows count in ``rows_dropped``, as when the
writer's queue is full: ``stats()`` never reports fewer lost rows than were lost.

Ground truth is differential: the same seeded training run without the fault; the rows it
stores minus the rows the faulty run stores are the rows lost.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import chrono

probes = pytest.importorskip("probes")

_spec = importlib.util.spec_from_file_location("chrono_reliability_moe_tiny_lost",
                                               Path(__file__).with_name("moe_tiny.py"))
moe_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(moe_tiny)

STEPS, EVERY = 10, 4   # windows: steps 0-3, 4-7, 8-9 (at detach)


def _run(root, tokens, monkeypatch, fail_window=None):
    import probes.sink as sink
    orig, seen = sink.finish, {"n": 0}

    def finish(job, *args):
        seen["n"] += 1
        if seen["n"] == fail_window:
            raise RuntimeError("simulated: this window's rows cannot be built")
        return orig(job, *args)

    monkeypatch.setattr(sink, "finish", finish)
    torch.manual_seed(0)
    model = moe_tiny.TinyMoE()
    with probes.attach(model, run="r", root=root, flush_every=EVERY, tokens=tokens, steps="manual") as h:
        moe_tiny.train_steps(model, STEPS, handle=h)
    monkeypatch.setattr(sink, "finish", orig)
    con = chrono.connect(root)
    rows = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("routing", "tokens")}
    return h.stats(), rows


@pytest.mark.parametrize("tokens", [0.0, 0.5], ids=["aggregate", "with_tokens"])
def test_a_window_whose_rows_cannot_be_built_counts_them_as_dropped(tmp_path, monkeypatch, tokens):
    clean, clean_rows = _run(tmp_path / "clean", tokens, monkeypatch)
    stats, rows = _run(tmp_path / "faulty", tokens, monkeypatch, fail_window=2)
    assert clean["rows_dropped"] == 0 and clean["write_errors"] == 0
    lost = sum(clean_rows.values()) - sum(rows.values())
    assert clean_rows["routing"] - rows["routing"] == 2 * 4 * 4   # steps 4-7 x 2 layers x 4 experts
    assert (clean_rows["tokens"] - rows["tokens"] > 0) == (tokens > 0)
    assert stats["rows_dropped"] == lost > 0
    assert stats["write_errors"] == 1
