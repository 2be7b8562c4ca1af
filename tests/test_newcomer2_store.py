"""newcomer2: a mistyped store root is said, not silently an empty store."""
from __future__ import annotations

import warnings

import pytest

import chrono
from chrono_cli.main import main


@pytest.fixture
def nested(tmp_path):
    """<tmp>/project/store holds one run; <tmp>/project is what a user passes by mistake."""
    store = tmp_path / "project" / "store"
    with chrono.open_run(store, "r1", model={"layers": [0], "experts_per_layer": {"0": 2}, "top_k": 1}) as w:
        w.log_routing(0, 0, [3, 1])
    return tmp_path / "project", store


def _warned(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in got if issubclass(w.category, UserWarning)]


def test_connect_to_a_missing_root_warns_and_stays_an_empty_store(tmp_path):
    con, msgs = _warned(lambda: chrono.connect(tmp_path / "chrono_rusn"))
    assert con.execute("SELECT count(*) FROM routing").fetchall() == [(0,)]   # the documented contract
    assert msgs == [f"no chrono store at {tmp_path / 'chrono_rusn'}: the directory does not exist"]
    lf, msgs = _warned(lambda: chrono.read(tmp_path / "chrono_rusn", "routing"))
    assert lf.collect().height == 0 and len(msgs) == 1 and "does not exist" in msgs[0]


def test_connect_to_the_parent_of_a_store_names_the_store(nested):
    parent, store = nested
    _, msgs = _warned(lambda: chrono.connect(parent))
    assert msgs == [f"no runs under {parent}; it holds the store {store} (pass that as the root)"]


def test_a_store_and_an_empty_directory_give_no_warning(nested, tmp_path):
    _, store = nested
    (tmp_path / "fresh").mkdir()
    for root in (store, tmp_path / "fresh"):   # a store; a directory a writer is about to fill
        con, msgs = _warned(lambda: chrono.connect(root))
        assert msgs == []
    assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]


def test_chrono_runs_on_the_parent_of_a_store_says_where_the_store_is(nested, capsys):
    parent, store = nested
    assert main(["--root", str(parent), "runs"]) == 0
    out, err = capsys.readouterr()
    assert "(no rows)" in out
    assert err == f"chrono: note: no runs under {parent}; it holds the store {store} (pass that as the root)\n"
    assert main(["--root", str(store), "runs"]) == 0
    out, err = capsys.readouterr()
    assert "r1" in out and err == ""
