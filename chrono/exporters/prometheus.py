"""Prometheus exporter: routing health of a run as metric families, built at scrape time.

Nothing is updated on the hot path: a custom collector reads its *source* when
Prometheus scrapes (DESIGN §7). The exporter is split by concept:

* ``chrono.exporters.sources``: ``LiveSource(handle)`` (a probes handle in the
  training process) and ``StoreSource(root, run=None)`` (runs on disk, followed
  through ``chrono.follow.Follower``; ``run=None`` follows the recently
  written runs);
* ``chrono.exporters.collector``: ``ChronoCollector`` and the metric tables
  ``SNAPSHOT_GAUGES`` / ``DECISION_GAUGES``;
* ``chrono.exporters.state``: ``ExportState``, limits, ``ExporterError``;
* this module: ``Exporter`` (a collector in its own private
  ``CollectorRegistry``, never the global one, so two exporters in one process
  do not collide) and ``serve(source, port)``, an HTTP endpoint on 127.0.0.1
  by default. Every public name above is importable from here.
"""
from __future__ import annotations

import errno

from prometheus_client import CollectorRegistry

from .collector import DECISION_GAUGES, SNAPSHOT_GAUGES, ChronoCollector
from .sources import LiveSource, StoreSource, as_source
from .state import (DEFAULT_MAX_EXPERT_SERIES, DEFAULT_MAX_RUNS, DEFAULT_PORT, DEFAULT_RECENT_S,
                    ExporterError, ExportState, layer_label)

__all__ = ["DEFAULT_PORT", "DEFAULT_MAX_EXPERT_SERIES", "DEFAULT_RECENT_S", "DEFAULT_MAX_RUNS",
           "SNAPSHOT_GAUGES", "DECISION_GAUGES", "ExporterError", "ExportState", "layer_label",
           "LiveSource", "StoreSource", "as_source", "ChronoCollector", "Exporter", "MetricsServer",
           "serve"]


class Exporter:
    """A collector in its own private registry (no global state)."""

    def __init__(self, source, expert_labels: bool = False,
                 max_expert_series: int = DEFAULT_MAX_EXPERT_SERIES):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ChronoCollector(source, expert_labels=expert_labels,
                                         max_expert_series=max_expert_series)
        self.registry.register(self.collector)

    def exposition(self) -> bytes:
        """The text exposition (format 0.0.4) one scrape would return."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsServer:
    """A running HTTP endpoint; ``.port``, ``.host``, ``.url``, ``.close()``; a context manager."""

    def __init__(self, exporter: Exporter, httpd, thread):
        self.exporter = exporter
        self.registry = exporter.registry
        self._httpd, self._thread = httpd, thread
        self.host = httpd.server_address[0]
        self.port = int(httpd.server_address[1])
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        close = getattr(self.exporter.collector.source, "close", None)
        if callable(close):
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(source, port: int = DEFAULT_PORT, host: str = "127.0.0.1", *, run: str | None = None,
          expert_labels: bool = False,
          max_expert_series: int = DEFAULT_MAX_EXPERT_SERIES) -> MetricsServer:
    """Serve ``/metrics`` for ``source`` (a probes handle, a store root path, or a source object).

    ``port=0`` picks a free port (see ``.port``). Binds 127.0.0.1 unless ``host``
    says otherwise. Raises ``ExporterError`` when the address cannot be bound.
    """
    from prometheus_client import start_http_server

    if not 0 <= int(port) <= 65535:
        raise ExporterError(f"port must be in 0..65535, got {port}")
    exporter = Exporter(as_source(source, run=run), expert_labels=expert_labels,
                        max_expert_series=max_expert_series)
    try:
        httpd, thread = start_http_server(int(port), addr=host, registry=exporter.registry)
    except OSError as e:
        reason = "address already in use" if getattr(e, "errno", None) == errno.EADDRINUSE else (e.strerror or str(e))
        raise ExporterError(f"cannot serve metrics on {host}:{port}: {reason}") from None
    return MetricsServer(exporter, httpd, thread)
