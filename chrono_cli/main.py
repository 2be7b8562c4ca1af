"""The ``chrono`` command line: the parser and the dispatch, nothing else.

Every user mistake (unknown run, bad SQL, bad id, missing root, bad option)
prints one line ``chrono: error: ...`` and exits with code 2, never a
traceback. Each command lives in a module of ``COMMANDS`` that exposes
``register(subparsers)``; building the parser imports those modules only, and
they import their heavy dependencies (pyarrow, duckdb, torch, reference_models)
inside the command function, so ``chrono --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from chrono_cli.common import EXIT_USER_ERROR, UserError

# One module per group of commands, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = (
    "chrono_cli.commands.runs",          # runs show query snapshot alerts compact
    "chrono_cli.commands.demo",
    "chrono_cli.commands.replay",
    "chrono_cli.commands.astarte",
    "chrono_cli.commands.dashboard",
    "chrono_cli.commands.serve_metrics",
    "chrono_cli.commands.workload",
    "chrono_cli.commands.migrate",
    "chrono_cli.commands.rm",
    "chrono_cli.commands.export",
    "chrono_cli.commands.analyze",
    "chrono_cli.commands.plan_placement",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(EXIT_USER_ERROR, f"chrono: error: {message} (see 'chrono --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="chrono",
        description="Routing telemetry and governance for Mixture-of-Experts models. "
                    "Reads and writes a store of Parquet files (one directory per run).",
    )
    p.add_argument("--root", default=None,   # None: chrono.store.default_root(), resolved in main()
                   help="store root directory (default: $CHRONO_ROOT, else ./chrono_runs)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in COMMANDS:
        importlib.import_module(mod).register(sub)
    _root_after_every_command(p)
    return p


def _root_after_every_command(parser: argparse.ArgumentParser) -> None:
    """``--root`` after any (sub)command name too (``chrono runs --root DIR``); given there, it
    overrides the one before the name (SUPPRESS: absent, the global value stays)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--root" not in sub._option_string_actions:
                    sub.add_argument("--root", default=argparse.SUPPRESS,
                                     help="store root (same as the global --root)")
                _root_after_every_command(sub)


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    if getattr(args, "root", None) is None:   # one owner of the default (the store's layout)
        from chrono.store.layout import default_root

        args.root = str(default_root())
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"chrono: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        return 0
    except OSError as e:  # unreadable root, output file not writable, ...
        print(f"chrono: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        code = _known_error(e)
        if code is None:
            raise
        return code
    except KeyboardInterrupt:
        print("chrono: interrupted", file=sys.stderr)
        return 130


def _known_error(e: Exception) -> int | None:
    """Exit code for the core's user-facing errors (printed as one line); None for anything else.

    The core's error types are imported here, on the error path only, so that
    dispatching a command imports nothing the command itself does not need.
    """
    import chrono

    if isinstance(e, (chrono.StoreError, chrono.QueryError, chrono.InvalidRowsError)):
        print(f"chrono: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    duckdb = sys.modules.get("duckdb")   # a duckdb.Error can only come from an imported duckdb
    if duckdb is None or not isinstance(e, duckdb.Error):
        return None
    # e.g. a part file whose pages are corrupt (its footer parsed, so it was listed)
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f"chrono: error: reading the store failed: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
