"""chrono_cli: the ``chrono`` command line, the application layer on top of every package.

It wires the pure core (``chrono``), the tensor and serving layer (``probes``,
``dashboard``, ``chrono.exporters``, ``chrono.lens``) and ``reference_models``
into commands; nothing below imports it. ``chrono_cli.main`` builds the parser
and dispatches; ``chrono_cli.commands.<name>`` hold the commands (each exposes
``register(subparsers)``); ``chrono_cli.common`` holds what they share. See
docs/architecture.md.
"""
