"""benchmarks/probe_overhead.py and benchmarks/probe_scale.py stay runnable (quick modes): JSON
structure, and every overhead arm counts what the bincount floor counts (correctness, not timing)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow   # two tiny HF Mixtral cells, ~8 arms x 4 steps each
def test_probe_overhead_quick(tmp_path):
    mod = _load("probe_overhead")
    out = tmp_path / "po.json"
    # a depth other than the default: every arm's buffers are sized from the routers found
    res = mod.main(["--quick", "--layers", "3", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert [(c["shape"], c["mode"], c["layers"]) for c in res["cells"]] == [("small", "train", 3),
                                                                           ("small", "infer", 3)]
    for cell in res["cells"]:
        check = cell["counts_equal_floor"]
        # every arm that counts (all but the two empty A/A arms) is checked against the floor
        assert set(check) == set(mod.ARMS) - {"none_a", "none_b"} | {"floor_tokens"}
        assert check.pop("floor_tokens") == 2 * 32 * mod.TOP_K * 3
        assert all(check.values()), check
        assert list(cell["arms"]) == mod.ARMS
        for name, arm in cell["arms"].items():
            assert len(arm["steps_s"]) == len(arm["in_hook_s"]) == 2
            assert arm["step_ms"] > 0 and arm["in_hook_ms"] >= 0
            for key in ("in_hook_net_ms", "in_hook_ratio_vs_sglang_style", "in_hook_ratio_vs_bincount_floor",
                        "step_ratio_vs_none_a", "h_step_ms"):
                assert key in arm
        assert cell["arms"]["chrono_aggregate"]["h_step_ms"] is not None
    assert "load average" in res["uptime"]


@pytest.mark.slow   # a window closes at every step: Parquet writes, ~10 s (45 s on 2 busy cores)
def test_probe_scale_quick(tmp_path):
    mod = _load("probe_scale")
    out = tmp_path / "ps.json"
    res = mod.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert "stand-in" in res["model"] and "load average" in res["uptime"]
    assert [c["flush_every"] for c in res["cells"]] == [1, 2]
    shape = mod.SHAPES["tiny"]
    for c in res["cells"]:
        assert c["steps"] == 4 and c["windows_closed"] == 4 // c["flush_every"]
        assert len(c["stall_ms"]) == c["windows_closed"]
        assert c["window_close_stall_ms_max"] >= c["window_close_stall_ms_median"] > 0
        assert c["window_close_cpu_ms_max"] >= c["window_close_cpu_ms_median"] > 0
        assert c["in_hook_ms_per_step"] > 0 and c["write_errors"] == 0
        # acc + win + two history buffers (double buffering, both used once 2 windows closed):
        # 4 kinds x 3 modes x layers x (experts + 2) float64, x (2 + 2 x flush_every)
        assert c["device_buffer_bytes"] == \
            4 * 3 * shape["layers"] * (shape["experts"] + 2) * 8 * (2 + 2 * c["flush_every"])
        assert c["after_close_step_ms_median"] is not None
        assert c["parquet_bytes_per_step"]["routing"] > 0 and c["parquet_bytes_per_step"]["snapshots"] > 0
        assert c["rows_written"]["routing"] == 4 * shape["layers"] * shape["experts"]
    assert res["cells"][1]["h_step_ms"] is not None   # flush_every 2: every other step closes no window


@pytest.mark.slow   # two handles, a window closing at every step of each (~10 s)
def test_probe_scale_backends_take_turns_and_store_the_same_rows(tmp_path):
    mod = _load("probe_scale")
    res = mod.main(["--quick", "--backends", "native", "torch_ops", "--out",
                    str(tmp_path / "ps.json"), "--cache", str(tmp_path / "cache")])
    shape = mod.SHAPES["tiny"]
    assert [(c["flush_every"], c["backend"], c["native"], c["interleaved_with"]) for c in res["cells"]] == \
        [(f, "native", True, ["torch_ops"]) if b == 0 else (f, "torch_ops", False, ["native"])
         for f in (1, 2) for b in (0, 1)]
    for c in res["cells"]:
        assert c["steps"] == 4 and c["windows_closed"] == 4 // c["flush_every"] and c["write_errors"] == 0
        assert c["rows_written"]["routing"] == 4 * shape["layers"] * shape["experts"]
        assert c["rows_equal_across_backends"] is True
        assert c["in_hook_ms_per_step"] > 0


@pytest.mark.slow   # one tiny HF Mixtral cell, 5 arms x 3 forwards, and one torch.compile (~10 s)
def test_flush_anatomy_quick(tmp_path):
    mod = _load("flush_anatomy")
    out = tmp_path / "fa.json"
    res = mod.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    (cell,) = res["cells"]
    assert (cell["shape"], cell["mode"], cell["layers"]) == ("small", "train", 3)
    # the eager and the compiled flush count what a bincount of each router's indices counts
    assert cell["counts_equal_truth"] == {"compiled": True, "eager_a": True}
    assert set(cell["flush_us"]) == {"eager_a", "eager_b", "compiled", "chrono"}
    assert all(v > 0 for v in cell["flush_us"].values()) and cell["ratio_vs_eager_a"]["eager_a"] == 1.0
    assert list(cell["first_us"]) == list(cell["again_us"]) == mod.OPS
    assert "load average" in cell["uptime_after"]


def test_probe_ab_quick(tmp_path):
    """This tree's probes against HEAD's (git archive), sampling tokens too: all three handles
    store the same counts for the check step, and every timed round has one value per arm."""
    mod = _load("probe_ab")
    out = tmp_path / "ab.json"
    res = mod.main(["--quick", "--ref", "HEAD", "--tokens", "0.5", "--mode", "infer", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    cell = res["cell"]
    assert cell["counts_equal"] and cell["check_tokens"] == 2 * 16 * 2 * 4   # batch x seq x top-2 x layers
    assert {k: len(v) for k, v in cell["in_hook_s"].items()} == {"A": 2, "B": 2, "A2": 2}
    assert set(cell["per_round_ratio_quartiles"]) == {"A/B", "A2/B", "A/A2"}
    for lo, mid, hi in cell["per_round_ratio_quartiles"].values():
        assert 0 < lo <= mid <= hi
