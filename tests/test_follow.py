"""chrono.follow.Follower: which runs and parts changed, checked against the files on disk.

Ground truth comes from the directory listing and the parts' own Parquet
metadata (pyarrow), never from chrono.store's listing that the follower uses.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import chrono
from chrono.follow import Follower
from chrono.store import compact, delete_run, table_dir


def _names_on_disk(root, table, run) -> set[str]:
    d = table_dir(root, table, run)
    return {n for n in os.listdir(d) if n.startswith("part-") and n.endswith(".parquet")} if d.is_dir() else set()


def _visible_on_disk(root, table, run) -> set[str]:
    """Part names on disk minus those another part's metadata says it replaces."""
    names = _names_on_disk(root, table, run)
    replaced = set()
    for n in names:
        kv = pq.read_metadata(table_dir(root, table, run) / n).metadata or {}
        replaced |= set(json.loads(kv.get(b"chrono.replaces", b"[]")))
    return names - replaced


def _names(parts) -> set[str]:
    return {os.path.basename(p.path) for p in parts}


def _write(w, step, n_layers=2, n_experts=4):
    for layer in range(n_layers):
        w.log_routing(step, layer, np.arange(1, n_experts + 1) + step)
    w.flush()


def test_first_poll_sees_every_run_and_part(store_root):
    for run in ("a", "b"):
        with chrono.open_run(store_root, run) as w:
            for step in range(3):
                _write(w, step)
    f = Follower(store_root)
    ch = f.poll()
    assert ch.appeared == ("a", "b") and ch.gone == ()
    for run in ("a", "b"):
        assert _names(ch.runs[run].added["routing"]) == _names_on_disk(store_root, "routing", run)
        assert len(_names_on_disk(store_root, "routing", run)) == 3
        assert ch.runs[run].manifest


def test_two_parts_in_one_mtime_tick(store_root):
    """The second part lands with the directory's mtime unchanged: the follower still sees it."""
    w = chrono.open_run(store_root, "r")
    _write(w, 0)
    d = table_dir(store_root, "routing", "r")
    guarded, trusting = Follower(store_root), Follower(store_root, fresh_s=0.0)
    guarded.poll()
    trusting.poll()
    before = _names_on_disk(store_root, "routing", "r")
    st = os.stat(d)
    _write(w, 1)
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))   # same tick: the rename left the mtime as it was
    assert os.stat(d).st_mtime_ns == st.st_mtime_ns
    new = _names_on_disk(store_root, "routing", "r") - before
    assert len(new) == 1
    ch = guarded.poll()
    assert _names(ch.runs["r"].added["routing"]) == new
    assert _names(guarded.parts("r", "routing")) == _names_on_disk(store_root, "routing", "r")
    # control: a follower that trusts the stamp at once misses that part (what the guard is for)
    assert "r" not in trusting.poll().runs
    assert _names(trusting.parts("r", "routing")) == before
    w.close()


def test_nothing_changed_reports_nothing(store_root):
    with chrono.open_run(store_root, "r") as w:
        _write(w, 0)
    f = Follower(store_root, fresh_s=0.0)
    assert f.poll()
    v = f.version("r")
    assert not f.poll()
    assert f.version("r") == v
    slow = Follower(store_root)   # stamps still fresh: it re-lists, yet reports no change
    slow.poll()
    assert not slow.poll() and slow.version("r") == v


def test_compaction_supersedes_parts(store_root):
    with chrono.open_run(store_root, "r") as w:
        for step in range(4):
            _write(w, step)
    f = Follower(store_root)
    f.poll()
    old = _names_on_disk(store_root, "routing", "r")
    v = f.version("r")
    assert compact(store_root, "r")
    ch = f.poll()
    now = _visible_on_disk(store_root, "routing", "r")
    assert len(old) == 4 and len(now) == 1
    assert _names(ch.runs["r"].removed["routing"]) == old
    assert _names(ch.runs["r"].added["routing"]) == now
    assert _names(f.parts("r", "routing")) == now and f.version("r") != v
    # a crash between writing the merged part and deleting the old ones: old files back on disk,
    # superseded by the merged part's metadata, so nothing visible changes
    src = store_root.parent / "old"
    src.mkdir()
    merged = next(iter(now))
    shutil.copy(table_dir(store_root, "routing", "r") / merged, src / merged)
    for name in old:   # write stand-ins with the old names (any readable routing part will do)
        shutil.copy(src / merged, table_dir(store_root, "routing", "r") / name)
    assert _visible_on_disk(store_root, "routing", "r") == now
    assert "r" not in f.poll().runs
    assert _names(f.parts("r", "routing")) == now


def test_truncate_supersedes_the_parts_it_rewrites(store_root):
    w = chrono.open_run(store_root, "r")
    for step in range(5):
        _write(w, step)
    f = Follower(store_root)
    f.poll()
    before = _names_on_disk(store_root, "routing", "r")
    w.truncate(3)
    ch = f.poll().runs["r"]
    after = _visible_on_disk(store_root, "routing", "r")
    assert _names(ch.removed["routing"]) == before - after
    assert _names(ch.added["routing"]) == after - before
    assert _names(f.parts("r", "routing")) == after
    steps = {s for p in f.parts("r", "routing") for s in pq.read_table(p.path)["step"].to_pylist()}
    assert steps == {0, 1, 2}
    w.close()


def test_new_run_and_deleted_run(store_root):
    with chrono.open_run(store_root, "a") as w:
        _write(w, 0)
    f = Follower(store_root)
    assert f.poll().appeared == ("a",)
    with chrono.open_run(store_root, "b") as w:
        _write(w, 0)
    ch = f.poll()
    assert ch.appeared == ("b",) and ch.gone == () and set(ch.runs) == {"b"}
    assert f.runs() == ["a", "b"]
    delete_run(store_root, "a")
    ch = f.poll()
    assert ch.gone == ("a",) and ch.appeared == ()
    assert f.runs() == ["b"] and f.parts("a", "routing") == ()


def test_run_recreated_under_the_same_id_between_polls(store_root):
    """Part names restart at part-00000-00000000 after a delete: identity includes size/mtime/inode."""
    with chrono.open_run(store_root, "r") as w:
        _write(w, 0, n_experts=4)
    f = Follower(store_root)
    f.poll()
    first = f.parts("r", "routing")
    delete_run(store_root, "r")
    with chrono.open_run(store_root, "r") as w:
        _write(w, 0, n_experts=64)
    assert _names_on_disk(store_root, "routing", "r") == _names(first)   # same names again
    ch = f.poll().runs["r"]
    assert ch.removed["routing"] == first
    assert _names(ch.added["routing"]) == _names(first)


def test_manifest_change_and_pinned_runs(store_root):
    w = chrono.open_run(store_root, "a")
    _write(w, 0)
    with chrono.open_run(store_root, "b") as wb:
        _write(wb, 0)
    f = Follower(store_root, fresh_s=0.0)
    assert f.poll(runs=["a"]).appeared == ("a",) and f.runs() == ["a"]
    w.update_manifest(note="x")
    assert f.poll(runs=["a"]).runs["a"].manifest
    assert f.poll(runs=["b", "nope"]).appeared == ("b",) and f.runs() == ["b"]
    stamps = f.stamps()
    assert set(stamps) == {"a", "b"}
    tables = [p / "run_id=b" for p in store_root.iterdir() if p.name != "runs" and (p / "run_id=b").is_dir()]
    assert tables   # the table directories b wrote, plus its manifest
    assert stamps["b"] == max(os.stat(p).st_mtime_ns
                              for p in tables + [store_root / "runs" / "run_id=b" / "manifest.json"])
    w.close()


def test_manifest_rewritten_in_place_within_one_tick(store_root):
    """Same size, same mtime, same inode: only the content tells, and it is read while fresh."""
    with chrono.open_run(store_root, "r") as w:
        _write(w, 0)
    f = Follower(store_root)
    f.poll()
    path = store_root / "runs" / "run_id=r" / "manifest.json"
    st = os.stat(path)
    text = path.read_bytes()
    i = text.index(b'"r"')
    with open(path, "r+b") as fh:   # "r" -> "q": same length, in place
        fh.seek(i + 1)
        fh.write(b"q")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_ino == st.st_ino and os.stat(path).st_size == st.st_size
    assert f.poll().runs["r"].manifest


@pytest.mark.parametrize("fresh_s", [0.0, 1.0])
def test_version_changes_with_every_new_part(store_root, fresh_s):
    w = chrono.open_run(store_root, "r")
    f = Follower(store_root, fresh_s=fresh_s)
    seen = set()
    for step in range(4):
        _write(w, step)
        f.poll()
        seen.add(f.version())
        assert _names(f.parts("r", "routing")) == _names_on_disk(store_root, "routing", "r")
    assert len(seen) == 4
    w.close()


def test_legacy_layout_and_a_part_moved_by_migrate(tmp_path):
    """A pre-hive store (<root>/<run>/<table>/) is followed; a part moved to its hive place moves too."""
    root = tmp_path / "store"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "store_v1"), root)
    legacy = root / "v1-run" / "routing"
    f = Follower(root)
    ch = f.poll()
    assert ch.appeared == ("v1-run",) and ch.runs["v1-run"].manifest
    assert _names(f.parts("v1-run", "routing")) == {n for n in os.listdir(legacy) if n.endswith(".parquet")}
    assert f.stamps()["v1-run"] > 0
    name = sorted(os.listdir(legacy))[0]
    hive = table_dir(root, "routing", "v1-run")
    hive.mkdir(parents=True)
    os.replace(legacy / name, hive / name)   # what `chrono migrate` does, one part at a time
    ch = f.poll().runs["v1-run"]
    assert [p.path for p in ch.removed["routing"]] == [str(legacy / name)]
    assert [p.path for p in ch.added["routing"]] == [str(hive / name)]
