"""`chrono analyze` and `chrono plan-placement`: formats, files, one-line errors, no torch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import chrono
from chrono.analysis import Scope, analyze
from chrono_cli.main import main
from tests.analysis.hand_store import AGG_RUN, RUN, build

KINDS = ["coactivation", "vocabulary", "transitions", "drift", "loads"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("cli") / "store"
    build(r)
    return r


@pytest.mark.parametrize("kind", KINDS)
def test_analyze_json_equals_the_library(root, kind, capsys):
    assert main(["--root", str(root), "analyze", RUN, kind, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    lib = analyze(chrono.connect(root), kind, Scope(RUN))
    assert doc["kind"] == kind and doc["run"] == RUN and doc["needs"] == lib.needs
    assert doc["rows"] == json.loads(json.dumps(lib.table.to_pylist()))
    assert doc["rows"]


def test_analyze_table_and_csv(root, capsys):
    assert main(["--root", str(root), "analyze", RUN, "loads", "--layer", "0"]) == 0
    out = capsys.readouterr().out
    assert "needs: routing" in out and "max_violation" in out and "summary:" in out
    assert main(["--root", str(root), "analyze", RUN, "coactivation", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('"layer","expert_a"') and len(lines) == 1 + 2 * 6


def test_analyze_table_says_more_rows(root, capsys):
    assert main(["--root", str(root), "analyze", RUN, "coactivation", "--max-rows", "3"]) == 0
    assert "... 9 more rows" in capsys.readouterr().out


def test_analyze_drift_against(root, capsys):
    assert main(["--root", str(root), "analyze", RUN, "drift", "--steps", "0:1", "--against", "1:2",
                 "--min-count", "1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["top1_changed"] for r in rows] == [0.0, 0.5]


@pytest.mark.parametrize("argv,match", [
    ([AGG_RUN, "coactivation"], "needs per-token rows"),
    ([AGG_RUN, "vocabulary"], "tokens="),
    (["nope", "loads"], "unknown run"),
    ([RUN, "loads", "--steps", "9:2"], "empty step range"),
    ([RUN, "loads", "--steps", "x"], "bad step range"),
    ([RUN, "drift", "--windows", "1"], "--windows must be >= 2"),
    ([RUN, "vocabulary", "--top", "0"], "--top must be >= 1"),
    ([RUN, "loads", "--steps", "100:200"], "has none in steps 100:200"),
])
def test_analyze_user_errors_are_one_line(root, argv, match, capsys):
    assert main(["--root", str(root), "analyze", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chrono: error:") and match in err and err.count("\n") == 1


def test_plan_placement_writes_engine_files(root, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["--root", str(root), "plan-placement", RUN, "--gpus", "2", "--replicas", "2",
                 "--model-layers", "3", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before_ratio" in text and "after_ratio" in text
    sg = json.loads((out / "sglang_init_expert_location.json").read_text())
    # SGLang passes the file's keys to init_by_mapping(**data): only this key may be present
    assert list(sg) == ["physical_to_logical_map"]
    assert len(sg["physical_to_logical_map"]) == 3 and all(len(r) == 6 for r in sg["physical_to_logical_map"])
    assert sg["physical_to_logical_map"][2] == [0, 1, 2, 3, 0, 1]  # unrecorded layer: trivial
    vl = json.loads((out / "vllm_eplb_state.json").read_text())
    assert len(vl["physical_to_logical_map"]) == 2  # vLLM indexes MoE layers only
    assert all(len(e) == 3 for layer in vl["logical_to_physical_map"] for e in layer)  # replicas + 1
    assert vl["global_expert_load"] == [[8, 6, 10, 8], [8, 8, 8, 8]]
    vm = json.loads((out / "vllm_initial_expert_map.json").read_text())
    assert vm == vl["physical_to_logical_map"]  # a bare list of per-MoE-layer rows
    ch = json.loads((out / "placement.json").read_text())
    assert ch["format"] == "chrono.placement/1" and ch["layers"] == [0, 1]
    # layer 0 totals [8, 6, 10, 8], trivial slots [0 1 2 | 3 0 1]: GPU0 8/2 + 6/2 + 10 = 17, GPU1 15
    assert ch["per_layer"][0]["before_max"] == pytest.approx(17.0)
    assert ch["per_layer"][0]["after_max"] == pytest.approx(16.0)  # the optimum: 32 / 2
    for layer_map, counts in zip(ch["physical_to_logical_map"], ch["logical_count"]):
        assert sorted(layer_map) == sorted(e for e, c in enumerate(counts) for _ in range(c))


def test_plan_placement_errors(root, capsys):
    assert main(["--root", str(root), "plan-placement", RUN, "--gpus", "3"]) == 2
    assert "do not split evenly over 3 GPUs" in capsys.readouterr().err
    assert main(["--root", str(root), "plan-placement", RUN, "--gpus", "2", "--model-layers", "1"]) == 2
    assert "--model-layers" in capsys.readouterr().err


def test_analysis_commands_do_not_import_torch(root, tmp_path):
    code = ("import sys; from chrono_cli.main import main\n"
            "for argv in (['analyze', 'hand', k, '--format', 'json'] for k in %r):\n"
            "    assert main(['--root', sys.argv[1]] + argv) == 0\n"
            "assert main(['--root', sys.argv[1], 'plan-placement', 'hand', '--gpus', '2', '-o', sys.argv[2]]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n") % (KINDS,)
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(tmp_path / "p")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("steps", [[], ["--steps", "0:2"], ["--steps", "0:"]])
def test_analyze_drift_against_an_overlapping_range_is_refused(root, steps, capsys):
    # newcomer2: `--against 0:1` with all steps (0:2) printed a table of empty js cells and a
    # summary of nulls, exit 0: each step went to the first range only, so the reference was empty.
    assert main(["--root", str(root), "analyze", RUN, "drift", "--against", "0:1", *steps]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chrono: error:") and "overlap" in err and err.count("\n") == 1
