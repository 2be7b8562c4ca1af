"""chrono.connect uses the machine's cores by default; threads= / $CHRONO_DUCKDB_THREADS set it (issue 19 item 5)."""
from __future__ import annotations

import duckdb
import pytest

import chrono
try:   # the CLI moves to chrono_cli (issue 17, h-layers); the lead keeps one import after the merge
    from chrono_cli.main import main
except ImportError:
    from chrono.cli import main
from chrono.reader import ThreadsError


def _threads(con) -> int:
    return con.execute("SELECT current_setting('threads')").fetchone()[0]


def test_default_is_duckdbs_own(tmp_path, monkeypatch):
    monkeypatch.delenv("CHRONO_DUCKDB_THREADS", raising=False)
    plain = _threads(duckdb.connect(":memory:"))     # DuckDB's default on this machine
    assert _threads(chrono.connect(tmp_path)) == plain


@pytest.mark.parametrize("n", [1, 3, "2"])
def test_threads_argument(tmp_path, monkeypatch, n):
    monkeypatch.setenv("CHRONO_DUCKDB_THREADS", "5")   # the argument wins over the variable
    assert _threads(chrono.connect(tmp_path, threads=n)) == int(n)


def test_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONO_DUCKDB_THREADS", "3")
    assert _threads(chrono.connect(tmp_path)) == 3
    monkeypatch.setenv("CHRONO_DUCKDB_THREADS", "")   # empty: unset
    assert _threads(chrono.connect(tmp_path)) == _threads(duckdb.connect(":memory:"))


@pytest.mark.parametrize("bad", [0, -1, "x", 1.5, True, "1.5"])
def test_bad_threads_argument(tmp_path, bad):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        chrono.connect(tmp_path, threads=bad)


def test_bad_environment_variable_is_one_cli_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHRONO_DUCKDB_THREADS", "many")
    with pytest.raises(ThreadsError, match=r"\$CHRONO_DUCKDB_THREADS"):
        chrono.connect(tmp_path)
    assert main(["--root", str(tmp_path), "query", "SELECT 1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chrono: error: $CHRONO_DUCKDB_THREADS must be an integer >= 1 (DuckDB worker threads), "
                   "got 'many'"]
