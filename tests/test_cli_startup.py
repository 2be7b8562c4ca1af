"""Start-up of the ``chrono`` command (issue 17 item 2), checked by what each call imports, never by time.

``chrono --help`` builds the whole parser without pandas, pyarrow, DuckDB, polars,
torch or any workload; ``chrono runs`` reads the store without pyarrow, numpy, torch or pandas;
``import chrono`` loads nothing heavy until a name is used. The timing lives in
benchmarks/startup.py.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("pandas", "pyarrow", "duckdb", "polars", "torch", "numpy", "transformers", "streamlit")


def imported_by(argv: list[str] | None, prelude: str = "") -> tuple[int, set[str], str]:
    """(exit code, top-level packages in sys.modules, stdout) of one ``chrono`` call in a fresh interpreter."""
    code = (f"import json, sys\n{prelude}\n"
            "rc = 0\n"
            "if ARGV is not None:\n"
            "    from chrono_cli.main import main\n"
            "    try:\n"
            "        rc = main(ARGV)\n"
            "    except SystemExit as e:\n"
            "        rc = e.code\n"
            "sys.stdout.flush()\n"
            "sys.stderr.write('\\nMODULES ' + json.dumps(sorted(sys.modules)) + '\\n')\n"
            "sys.exit(rc)\n").replace("ARGV", repr(argv))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    line = [l for l in proc.stderr.splitlines() if l.startswith("MODULES ")]
    assert line, proc.stderr
    return proc.returncode, set(json.loads(line[-1][len("MODULES "):])), proc.stdout


def _tops(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Runs of every kind ``chrono runs`` reads: routing only, snapshots with raised alerts and a
    compacted (superseding) part, and a version-1 run in the legacy layout."""
    import shutil

    import chrono
    from chrono.snapshots import alerts_for, build_snapshots

    root = tmp_path_factory.mktemp("startup")
    with chrono.open_run(root, "r1", model={"layers": [0], "experts_per_layer": {"0": 4}, "top_k": 1}) as w:
        w.log_routing(0, 0, [5, 1, 0, 2])
    with chrono.open_run(root, "collapsing", model={"layers": [0], "experts_per_layer": {"0": 4}}) as w:
        for s in range(30):
            w.log_routing(s, 0, [25, 25, 25, 25] if s < 10 else [97, 1, 1, 1])
    routing = chrono.connect(root).sql("SELECT step, layer, expert, tokens, dropped FROM routing "
                                       "WHERE run_id = 'collapsing'").to_arrow_table()
    snaps = build_snapshots("collapsing", routing, 5)
    with chrono.open_run(root, "collapsing") as w:
        w.replace_table("snapshots", snaps)
        w.replace_table("alerts", alerts_for(snaps))
    shutil.copytree(REPO / "tests" / "fixtures" / "store_v1" / "v1-run", root / "v1-run")
    return root


def test_help_imports_no_heavy_package_and_no_workload():
    rc, mods, out = imported_by(["--help"])
    assert rc == 0 and "workload" in out and "plan-placement" in out   # every command registered
    assert not _tops(mods) & set(HEAVY), sorted(_tops(mods) & set(HEAVY))
    assert {m for m in mods if m.split(".")[0] == "reference_models"} <= {"reference_models",
                                                                       "reference_models.registry"}
    assert not _tops(mods) & {"probes", "dashboard"}


@pytest.mark.parametrize("command", ["workload", "demo", "dashboard", "analyze", "export", "astarte"])
def test_every_commands_help_is_cheap(command):
    rc, mods, out = imported_by([command, "--help"])
    assert rc == 0 and "usage: chrono" in out
    assert not _tops(mods) & set(HEAVY), sorted(_tops(mods) & set(HEAVY))
    if command == "workload":   # names and descriptions come from the registry, no workload imported
        assert all(n in out for n in ("semantic-moe", "bio-moe", "astarte", "var"))


def test_runs_imports_neither_pyarrow_nor_numpy_torch_or_pandas(store):
    rc, mods, out = imported_by(["--root", str(store), "runs"])
    rows = {l.split()[0]: l.split() for l in out.splitlines()[1:]}
    assert rc == 0 and set(rows) == {"r1", "collapsing", "v1-run"}, out
    assert rows["collapsing"][1] != "OK" and rows["v1-run"][-5:-3] == ["10", "9"]   # alerts, legacy steps
    assert "duckdb" in _tops(mods)            # it did read the store
    unwanted = {"pyarrow", "numpy", "torch", "pandas", "polars", "probes", "dashboard"}
    assert not _tops(mods) & unwanted, sorted(_tops(mods) & unwanted)
    assert {m for m in mods if m.split(".")[0] == "reference_models"} <= {"reference_models",
                                                                       "reference_models.registry"}


def test_import_chrono_is_lazy_and_every_public_name_resolves():
    rc, mods, _ = imported_by(None, prelude="import chrono")
    assert rc == 0 and not _tops(mods) & set(HEAVY)
    import chrono

    for name in chrono.__all__ + ["lens", "controller", "snapshots", "lifecycle", "exporters", "govern"]:
        assert getattr(chrono, name) is not None, name
    from chrono import connect, open_run   # from-import goes through the same lazy path
    assert connect is chrono.reader.connect and open_run is chrono.store.open_run
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        chrono.nope  # noqa: B018


def _stdlib_only(path: Path) -> list[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops.add(node.module.split(".")[0])
    return sorted(t for t in tops if t not in sys.stdlib_module_names)


def test_the_workload_registry_the_help_reads_imports_only_the_standard_library():
    assert _stdlib_only(REPO / "reference_models" / "registry.py") == []
    assert (REPO / "reference_models" / "__init__.py").read_text().count("import") == 0


def test_every_workload_entry_has_the_one_signature_the_cli_calls():
    """``chrono workload`` calls ``fn(mode=, steps=, run=, seed=, root=, progress=)``; read from the source,
    so no workload (and no torch) is imported."""
    from reference_models.registry import WORKLOADS

    assert set(WORKLOADS) == {"semantic-moe", "bio-moe", "astarte", "var"}   # DESIGN §9
    for name, target in WORKLOADS.items():
        module, fn = target.split(":")
        tree = ast.parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text())
        (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == fn]
        params = [a.arg for a in func.args.args + func.args.kwonlyargs]
        assert {"mode", "steps", "run", "seed", "root", "progress"} <= set(params), (name, params)
        assert "run_id" not in params, name
