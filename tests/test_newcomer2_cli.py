"""newcomer2: replay / plan-placement row limits and wording (one-line errors, hints that work)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import chrono
from chrono.controller import ControlConfig, Controller
from chrono.governance import CONFIG_NAME
from chrono.snapshots import layer_rows
from chrono.store import run_dir
from chrono_cli.main import main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A run with routing (4 experts, skewed), snapshots and the decisions a controller took."""
    r = tmp_path_factory.mktemp("nc2") / "store"
    rng = np.random.default_rng(0)
    ctl = Controller(1, {0: 4}, ControlConfig())
    with chrono.open_run(r, "gov", model={"layers": [0], "experts_per_layer": {"0": 4}, "top_k": 1}) as w:
        for step in range(40):
            counts = rng.multinomial(100, [0.7, 0.2, 0.05, 0.05])
            w.log_routing(step, 0, counts)
            if step % 5 == 4:
                rows = layer_rows("gov", step - 4, step, {0: counts * 5})
                w.log_rows("snapshots", rows)
                w.log_rows("decisions", [d.as_row("gov") for d in ctl.update(rows)])
    (run_dir(r, "gov") / CONFIG_NAME).write_text(json.dumps(ctl.config.to_dict()))
    return r


def _run(root, *argv):
    return main(["--root", str(root), *argv])


def test_replay_show_says_how_to_see_more(root, capsys):
    # The hint was the query command's "use --format csv/json/parquet --output F for all":
    # replay has neither option, so following it gave "unrecognized arguments".
    assert _run(root, "replay", "gov", "--show", "3") == 0
    out = capsys.readouterr().out
    assert "reproduces all 8 decisions" in out
    assert "... 5 more rows (--show 8 shows all)" in out and "--format" not in out


@pytest.mark.parametrize("argv,match", [
    (["replay", "gov", "--show", "-2"], "--show must be >= 0"),
    (["replay", "gov", "--max-diffs", "-1"], "--max-diffs must be >= 0"),
    (["plan-placement", "gov", "--gpus", "2", "--max-rows", "0"], "--max-rows must be >= 1"),
    (["plan-placement", "gov", "--gpus", "2", "--max-rows", "-3"], "--max-rows must be >= 1"),
])
def test_bad_row_limits_are_one_line_errors(root, argv, match, capsys):
    # `--show -2` printed all but the last 2 decisions and a wrong "... 42 more rows";
    # plan-placement `--max-rows 0` printed "... 2 more rows" and "(no rows)" together.
    assert _run(root, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("chrono: error:") and match in err and err.count("\n") == 1


def test_plan_placement_says_what_before_and_after_are(root, capsys):
    assert _run(root, "plan-placement", "gov", "--gpus", "2") == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert "node(s)" not in first and "(1 node, " in first
    assert "before = trivial placement (slot p holds expert p mod 4)" in out
    assert "ratio = busiest GPU / mean GPU (1 = balanced)" in out
    assert "with the trivial placement," in out and "with this plan" in out
    assert "-o DIR" in out                               # where the engine files come from


def test_plan_placement_more_rows_hint(root, capsys, tmp_path):
    assert _run(root, "plan-placement", "gov", "--gpus", "2", "--max-rows", "1") == 0
    out = capsys.readouterr().out
    assert "--format csv/json/parquet" not in out            # plan-placement has no such formats


def test_show_says_how_the_run_is_governed(root, capsys):
    # `chrono show` listed "decisions 8" among the row counts and nothing else about governance.
    assert _run(root, "show", "gov") == 0
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if l.startswith("governed")]
    con = chrono.connect(root)
    ((acting,),) = con.execute("SELECT count(*) FILTER (WHERE NOT abstain) FROM decisions "
                               "WHERE run_id = 'gov' AND step = 39").fetchall()
    assert line == (f"governed lens, faithful policy; 8 decisions, the latest (step 39): {acting} of 1 layer "
                    f"acting ('chrono replay gov' re-derives them)")


def test_show_of_an_ungoverned_run_has_no_governed_line(tmp_path, capsys):
    with chrono.open_run(tmp_path, "plain", model={"layers": [0], "experts_per_layer": {"0": 2}}) as w:
        w.log_routing(0, 0, [1, 1])
    assert _run(tmp_path, "show", "plain") == 0
    assert not [l for l in capsys.readouterr().out.splitlines() if l.startswith("governed")]


def test_dashboard_help_names_every_page():
    # the one-line help listed 6 of the 8 pages (no Specialization, no Lifecycle & workloads)
    import ast
    from pathlib import Path

    from chrono_cli.commands import dashboard as cmd

    app = Path(__file__).resolve().parents[1] / "dashboard" / "streamlit_app.py"
    tree = ast.parse(app.read_text())
    (pages,) = [ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "PAGES"]
    assert len(pages) == 8
    assert all(title in cmd.HELP for _, title, _ in pages), cmd.HELP


def test_plan_placement_error_names_the_plan(root, capsys):
    # it said "load percentiles needs routing rows", the name of another analysis
    assert _run(root, "plan-placement", "gov", "--gpus", "2", "--layer", "9") == 2
    err = capsys.readouterr().err
    assert err == "chrono: error: the placement plan needs routing rows, and run 'gov' has none in all steps, layer 9\n"


def test_drift_overlap_suggests_a_range_that_exists(root, capsys):
    # `--against :` (the whole run) suggested "--steps 40: --against 0:40", past the last step
    assert _run(root, "analyze", "gov", "drift", "--against", ":") == 2
    err = capsys.readouterr().err
    assert "overlap" in err and "--steps 40:" not in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["plan-placement", "gov", "--gpus", "2", "-o", "{root}/routing"],
    ["plan-placement", "gov", "--gpus", "2", "-o", "{root}"],
    ["export", "tensorboard", "gov", "--logdir", "{root}"],
])
def test_writing_files_into_the_store_is_refused(root, argv, capsys):
    # plan-placement -o and export --logdir wrote their files among the store's tables
    # (routing/placement.json; <root>/gov/events... where a legacy-layout run 'gov' would live);
    # `chrono query --output` already refused this
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert _run(root, *[a.format(root=root) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chrono: error:") and "inside the store" in err and err.count("\n") == 1
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
