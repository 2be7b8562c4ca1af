"""benchmarks/gpu_check.py stays runnable: its CPU dry run passes every check that needs no CUDA
(exact counts, per-layer compile with zero graph breaks, the overhead table's count checks)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow   # builds and compiles a tiny HF Mixtral
def test_gpu_check_cpu_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu_check.json"
    res = mod.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    c = res["checks"]
    assert c["eager_counts_equal_truth"] is True and c["eager_tokens"] == 2 * 16 * 2 * 2
    assert c["compiled_counts_equal_eager"] is True
    assert c["checkpoint"]["counts_equal_truth"] is True
    assert c["padding_excluded"]["counts_equal_truth"] is True
    assert c["padding_excluded"]["tokens"] < c["eager_tokens"]
    assert c["checkpoint_offload"] == "skipped: cpu"
    assert c["host_syncs_per_step"]["aggregate"] == "skipped: cpu"
    assert c["sync_error"] == {"aggregate": "skipped: cpu", "tokens_1pct": "skipped: cpu"}
    pl = c["compiled_per_layer"]
    assert pl["backend"] == "eager"
    for name, rows in (("aggregate", 0), ("tokens_1pct", 3 * 2 * 2)):   # ceil(1 % of 32) = 1 token, top-2
        assert pl[name] == {"graph_breaks": 0, "counts_equal_eager": True, "token_rows_equal_eager": True,
                            "token_rows": rows}, pl[name]
    cells = res["overhead"]
    assert [(x["shape"], x["mode"], x["device"]) for x in cells] == [("small", "train", "cpu"), ("small", "infer", "cpu")]
    for cell in cells:
        check = dict(cell["counts_equal_floor"])
        assert check.pop("floor_tokens") == 2 * 16 * 2 * 4 and all(check.values()), check
