"""The part catalog and the store package's shape: cache keyed by file version, start-up cost."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import chrono
from chrono.reader import part_has_invalid_rows
from chrono.store import StoreError, part_files, table_dir
from chrono.store import catalog

REPO = Path(__file__).resolve().parents[1]


def _write(root, run="r", steps=4):
    with chrono.open_run(root, run) as w:
        for s in range(steps):
            w.log_routing(s, 0, np.arange(4))
            w.flush()


def _swap_same_size_and_mtime(path, data: bytes):
    """Replace ``path`` by ``data`` (same length) with the old mtime: a new inode is all that differs."""
    st = os.stat(path)
    assert len(data) == st.st_size
    tmp = path.with_name(".swap.tmp")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)
    st2 = os.stat(path)
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and st2.st_ino != st.st_ino


def test_a_part_replaced_within_one_mtime_tick_is_read_again(store_root, caplog):
    """Same name, size and mtime (a run deleted and rewritten within one tick of a coarse clock):
    the footer cache must not answer from the old file."""
    _write(store_root)
    first = Path(part_files(store_root, "routing", "r")[0])
    assert catalog.part_info(str(first), "routing").readable
    _swap_same_size_and_mtime(first, b"PAR1" + b"\0" * (first.stat().st_size - 4))
    with caplog.at_level("WARNING", logger="chrono.store"):
        assert not catalog.part_info(str(first), "routing").readable
        assert str(first) not in part_files(store_root, "routing", "r")
    assert sum("skipping unreadable part file" in r.getMessage() for r in caplog.records) == 1


def test_invalid_row_scan_is_keyed_by_file_version_too(store_root):
    _write(store_root)
    a, b = (Path(p) for p in part_files(store_root, "routing", "r")[:2])
    good = a.read_bytes()
    assert not part_has_invalid_rows(str(a), "routing")
    _swap_same_size_and_mtime(a, b"PAR1" + b"\0" * (len(good) - 4))
    assert part_has_invalid_rows(str(a), "routing")      # unreadable now: suspect
    assert not part_has_invalid_rows(str(b), "routing")


def test_part_info_of_missing_file_and_shared_column_sets(store_root):
    _write(store_root)
    files = part_files(store_root, "routing", "r")
    infos = [catalog.part_info(f, "routing") for f in files]
    assert all(i.readable and i.replaces == () for i in infos)
    assert infos[0].columns == set(pq.read_schema(files[0]).names)
    assert all(i.columns is infos[0].columns for i in infos)   # one set per schema, not per part
    assert catalog.part_info(str(table_dir(store_root, "routing", "r") / "part-00000-00000099.parquet"),
                             "routing") == (False, (), frozenset())
    assert catalog._read_part_info.cache_info().maxsize == catalog.CACHE_PARTS


def test_read_of_runs_points_to_connect(store_root):
    _write(store_root)
    with pytest.raises(StoreError, match=r"use chrono\.connect\(root\) for the runs view"):
        chrono.read(store_root, "runs")
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        chrono.read(store_root, "nope")


_BARE = ("import sys, types; pkg = types.ModuleType('chrono'); pkg.__path__ = [{path!r}]; "
         "sys.modules['chrono'] = pkg; import {module}; {extra}"
         "print(sorted(m for m in ('pyarrow', 'numpy', 'pandas', 'filelock') if m in sys.modules))")


@pytest.mark.parametrize("module,extra,loaded", [
    ("chrono.store", "from chrono.store import StoreError, list_runs, part_files, run_dir, meta_dir, "
                     "validate_run_id, default_root, require_run; ", []),
    ("chrono.store.writer", "", ["numpy", "pyarrow"]),
])
def test_store_modules_load_no_more_than_they_need(module, extra, loaded):
    """``import chrono.store`` (without chrono/__init__) loads no pyarrow; the writer no pandas."""
    code = _BARE.format(path=str(REPO / "chrono"), module=module, extra=extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == repr(loaded)
