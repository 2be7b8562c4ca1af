"""Exposure: servers bind 127.0.0.1 by default, and the dashboard's SQL console has a row
limit and cannot write or read outside the store root."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import chrono
from chrono_cli.main import build_parser
from chrono.reader import QueryError


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_servers_bind_localhost_by_default():
    from dashboard import server

    import probes

    assert server.DEFAULT_HOST == "127.0.0.1"
    assert _default(server.serve, "host") == "127.0.0.1"
    assert "127.0.0.1" in server.command()
    assert _default(probes.Handle.serve_metrics, "host") == "127.0.0.1"
    # every CLI subcommand with a --host option defaults to localhost
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    hosts = {name: a.default for name, p in sub.choices.items() for a in p._actions if a.dest == "host"}
    assert hosts and all(v == "127.0.0.1" for v in hosts.values()), hosts


def test_dashboard_sql_console_is_limited_and_sandboxed(tmp_path):
    from dashboard import data

    root = tmp_path / "store"
    with chrono.open_run(root, "r") as w:
        w.log_routing(0, 0, np.ones(4))
    (tmp_path / "secret.csv").write_text("a\n1\n")
    t = data.sql_console("SELECT * FROM range(1000000000000)", data.SQL_ROW_LIMIT, root=root)
    assert t.num_rows == data.SQL_ROW_LIMIT
    for sql in (f"SELECT * FROM read_csv('{tmp_path}/secret.csv')", "DROP VIEW routing",
                f"COPY routing TO '{tmp_path}/x.csv'", f"ATTACH '{tmp_path}/x.db'"):
        with pytest.raises(QueryError):
            data.sql_console(sql, 100, root=root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv", "store"]
    assert data.sql_console("SELECT sum(tokens) AS t FROM routing", 10, root=root).to_pylist() == [{"t": 4}]


def test_exporter_binds_localhost_and_never_writes(tmp_path):
    import urllib.error
    import urllib.request

    from chrono.exporters import prometheus

    assert _default(prometheus.serve, "host") == "127.0.0.1"
    root = tmp_path / "store"
    with chrono.open_run(root, "r") as w:
        w.log_routing(0, 0, np.ones(4))
    before = sorted((p.name, p.stat().st_size) for p in root.rglob("*"))
    with prometheus.serve(root, port=0) as srv:
        assert srv.host == "127.0.0.1"
        body = urllib.request.urlopen(srv.url, timeout=30).read()
        assert b"chrono_" in body
        for method in ("POST", "PUT", "DELETE"):
            req = urllib.request.Request(srv.url, data=b"x=1", method=method)
            try:
                urllib.request.urlopen(req, timeout=30).read()
            except urllib.error.HTTPError:
                pass  # refusing is fine; changing the store is not
    assert sorted((p.name, p.stat().st_size) for p in root.rglob("*")) == before


def test_storage_fault_is_exported_as_a_metric(tmp_path, monkeypatch, moe_tiny):
    """A write failure under probes shows up in the Prometheus exposition."""
    import errno

    import chrono.store.writer as store
    from chrono.exporters.prometheus import Exporter
    import probes

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.pq, "write_table", disk_full)

    model = moe_tiny.TinyMoE()
    with probes.attach(model, run="r", root=tmp_path, flush_every=2) as h:
        moe_tiny.train_steps(model, 4, batch=4)
        h.flush()
        text = Exporter(h).exposition().decode()
        monkeypatch.undo()
    line = next(ln for ln in text.splitlines() if ln.startswith("chrono_store_write_errors"))
    assert float(line.split()[-1]) >= 1, line
