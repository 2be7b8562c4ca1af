"""The store's hive layout: where files go, compaction keeps it, legacy runs read and migrate."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import chrono
from chrono_cli.main import main as cli_main
from chrono.schema import TABLES
from chrono.store import (PART_RE, StoreError, compact, delete_run, is_legacy_run, list_runs, part_files,
                          run_dir, table_dir)


def _write(root, run, ranks=(0,), steps=4, flush_every=2):
    """Routing + signals for ``run``; returns the expected per-expert token totals."""
    total = np.zeros(4, dtype=np.int64)
    for rank in ranks:
        with chrono.open_run(root, run, rank=rank, world_size=len(ranks)) as w:
            for step in range(steps):
                counts = np.arange(4 * 3).reshape(3, 4) + step + 10 * rank
                w.log_routing(step, np.arange(3), counts, rank=rank)
                w.log_signal(step, "loss", 1.0 / (step + 1))
                total += counts.sum(axis=0)
                if step % flush_every == flush_every - 1:
                    w.flush()
    return total


def _make_legacy(root, run, tmp_path):
    """``run`` written by chrono, then laid out the way pre-hive chrono did (``<root>/<run>/<table>/``)."""
    scratch = tmp_path / f"scratch-{run}"
    total = _write(scratch, run)
    legacy = root / run
    legacy.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir(scratch, run) / "manifest.json", legacy / "manifest.json")
    (legacy / "control_decisions.jsonl").write_text('{"step": 0}\n')
    for t in TABLES:
        src = table_dir(scratch, t, run)
        if src.is_dir():
            shutil.copytree(src, legacy / t)
    return total


def _counts(root, run=None):
    con = chrono.connect(root)
    where = "" if run is None else f"WHERE run_id = '{run}'"
    rows = con.sql(f"SELECT expert, sum(tokens) FROM routing {where} GROUP BY expert ORDER BY expert").fetchall()
    return np.array([n for _, n in rows], dtype=np.int64)


def test_parts_are_hive_partitioned_by_run(store_root):
    _write(store_root, "r1", ranks=(0, 1))
    top = sorted(p.name for p in store_root.iterdir())
    assert top == ["routing", "runs", "signals"]
    assert (store_root / "runs" / "run_id=r1" / "manifest.json").is_file()
    names = sorted(p.name for p in (store_root / "routing" / "run_id=r1").iterdir())
    assert [n[:11] for n in names] == ["part-00000-"] * 2 + ["part-00001-"] * 2   # two flushes per rank
    assert all(PART_RE.match(n) for n in names)
    assert list_runs(store_root) == ["r1"]


def test_compaction_keeps_the_hive_layout(store_root):
    total = _write(store_root, "r1", ranks=(0, 1), steps=6, flush_every=1)
    assert len(part_files(store_root, "routing", "r1")) == 12
    compact(store_root, "r1")
    files = part_files(store_root, "routing", "r1")
    assert len(files) == 2   # one per rank, same partition directory
    assert {os.path.dirname(f) for f in files} == {str(table_dir(store_root, "routing", "r1"))}
    assert sorted(os.listdir(table_dir(store_root, "routing", "r1"))) == sorted(map(os.path.basename, files))
    np.testing.assert_array_equal(_counts(store_root), total)


def test_numeric_looking_run_id_stays_a_string(store_root):
    """DuckDB and Polars would infer run_id=2024 as a number from the path; chrono reads the column."""
    _write(store_root, "2024")
    con = chrono.connect(store_root)
    assert con.sql("SELECT DISTINCT run_id, typeof(run_id) FROM routing").fetchall() == [("2024", "VARCHAR")]
    assert chrono.read(store_root, "routing", "2024").collect()["run_id"].unique().to_list() == ["2024"]


def test_delete_run_removes_only_that_run(store_root):
    _write(store_root, "a")
    keep = _write(store_root, "b")
    delete_run(store_root, "a")
    assert list_runs(store_root) == ["b"]
    assert not table_dir(store_root, "routing", "a").exists() and not run_dir(store_root, "a").exists()
    np.testing.assert_array_equal(_counts(store_root), keep)


def test_legacy_runs_are_read_beside_new_ones_and_migrate_moves_them(store_root, tmp_path, capsys):
    new = _write(store_root, "new")
    # "routing" and "runs" collide with the new layout's directory names on purpose
    legacy = {r: _make_legacy(store_root, r, tmp_path) for r in ("old", "routing", "runs")}
    assert list_runs(store_root) == ["new", "old", "routing", "runs"]
    for run, total in legacy.items():
        assert is_legacy_run(store_root, run)
        np.testing.assert_array_equal(_counts(store_root, run), total)
    np.testing.assert_array_equal(_counts(store_root, "new"), new)
    with pytest.raises(StoreError, match="pre-hive layout"):
        chrono.open_run(store_root, "old")
    assert cli_main(["--root", str(store_root), "compact", "old"]) == 2   # a writer: refused, one line
    assert "chrono migrate" in capsys.readouterr().err

    assert cli_main(["--root", str(store_root), "migrate"]) == 0
    assert list_runs(store_root) == ["new", "old", "routing", "runs"]
    for run, total in legacy.items():
        assert not is_legacy_run(store_root, run)
        assert (run_dir(store_root, run) / "control_decisions.jsonl").read_text() == '{"step": 0}\n'
        assert sorted(p.name for p in table_dir(store_root, "routing", run).iterdir())[0].startswith("part-")
        np.testing.assert_array_equal(_counts(store_root, run), total)
    np.testing.assert_array_equal(_counts(store_root, "new"), new)
    assert not (store_root / "old").exists()
    assert sorted(p.name for p in store_root.iterdir()) == ["routing", "runs", "signals"]
    with chrono.open_run(store_root, "old") as w:   # writable again, in the new layout
        w.log_signal(99, "loss", 0.0)
    assert cli_main(["--root", str(store_root), "migrate"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_demo_replaces_its_own_legacy_run(tmp_path, capsys):
    """`make demo` on a store left by an older chrono: the old demo run is replaced, not refused."""
    root = tmp_path / "store"
    _make_legacy(root, "demo", tmp_path)
    manifest = root / "demo" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(m, config={"demo": True})))
    assert cli_main(["--root", str(root), "demo", "--steps", "20", "--model-steps", "0", "--no-serve"]) == 0
    assert not (root / "demo").exists() and not is_legacy_run(root, "demo")
    con = chrono.connect(root)
    assert con.execute("SELECT count(*) FROM routing WHERE run_id = 'demo'").fetchall() == [(20 * 4 * 8,)]
