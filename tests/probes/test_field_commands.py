"""Exact in the field (issue 15): every command that writes a run treats stored steps the same way."""
from __future__ import annotations

import pytest

from chrono_cli.main import main
from chrono.store import StoreError
from field_truth import duplicate_keys, stored
from probe_models import tiny_workload


@pytest.fixture
def tiny(monkeypatch):
    from reference_models import registry
    monkeypatch.setitem(registry.WORKLOADS, "tiny", "probe_models:tiny_workload")
    monkeypatch.setitem(registry.DESCRIPTIONS, "tiny", "test workload")


def test_workload_twice_is_refused_then_replaced_on_request(store_root, tiny, capsys):
    args = ["--root", str(store_root), "workload", "tiny", "--run", "t"]
    assert main(args) == 0
    first = stored(store_root, "t")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert {k: v.tolist() for k, v in stored(store_root, "t").items()} == \
        {k: v.tolist() for k, v in first.items()}
    assert main(args + ["--overwrite", "--seed", "1"]) == 0
    again = stored(store_root, "t")
    assert sorted({k[0] for k in again}) == [0, 1, 2]
    assert duplicate_keys(store_root, "t") == 0
    assert any((again[k] != first[k]).any() for k in first)       # the new run's data, not the old


def test_workload_library_call_on_a_stored_run_is_a_clear_error(store_root):
    tiny_workload(run="lib", root=store_root)
    with pytest.raises(StoreError, match="already has steps up to 2"):
        tiny_workload(run="lib", root=store_root)
    assert duplicate_keys(store_root, "lib") == 0
