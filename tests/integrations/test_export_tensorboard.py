"""``chrono export tensorboard``: every stored value read back with tensorboard's EventAccumulator."""
import numpy as np
import pyarrow.dataset as ds
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import chrono
from chrono_cli.main import main
from chrono.schema import SNAPSHOTS
from chrono.snapshots import alerts_for, build_snapshots

RUN = "exp"
LAYERS, EXPERTS, STEPS = 3, 6, 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A run with routing drifting into collapse, snapshots + alerts, decisions and signals (2 ranks)."""
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    with chrono.open_run(root, RUN, model={"name": "t"}) as w:
        for s in range(STEPS):
            for layer in range(LAYERS):
                p = np.ones(EXPERTS) / EXPERTS
                if layer == 2 and s >= 10:   # collapses onto two experts: alerts raised
                    p = np.array([0.8, 0.2] + [0.0] * (EXPERTS - 2))
                w.log_routing(s, layer, rng.multinomial(256, p))
            w.log_signal(s, "loss", float(rng.random()))
            w.log_signal(s, "probes.nonfinite", float(s), layer=1)
        w.log_rows("decisions", [dict(step=s, layer=l, actuator="bias", debt=float(rng.random()),
                                      pressure=float(rng.random()), heat=0.5, forgetting=0.1,
                                      lens_scale=0.0, backoff=1.0, abstain=bool(s % 20 == 0),
                                      reason="test", neff=None, top2_share=None)
                                 for s in (9, 19, 29, 39) for l in range(LAYERS)])
    with chrono.open_run(root, RUN, rank=1, world_size=2) as w:
        w.log_signal(5, "loss", 2.5)
    con = chrono.connect(root)
    routing = con.sql("SELECT step, layer, expert, sum(tokens) AS tokens, sum(dropped) AS dropped "
                      "FROM routing GROUP BY ALL").to_arrow_table()
    snaps = build_snapshots(RUN, routing, 5)
    alerts = alerts_for(snaps)
    assert alerts.num_rows > 0   # the fixture must exercise the text export
    with chrono.open_run(root, RUN) as w:
        w.replace_table("snapshots", snaps)
        w.replace_table("alerts", alerts)
    return root


def _read_back(path):
    ea = EventAccumulator(str(path), size_guidance={"tensors": 0})
    ea.Reload()
    out = {}
    for tag in ea.Tags()["tensors"]:
        for ev in ea.Tensors(tag):
            v = tensor_util.make_ndarray(ev.tensor_proto)
            out[(tag, ev.step)] = v.item() if v.dtype != object else v.reshape(-1)[0].decode()
    return out


def _table(root, name):
    """The stored rows, read with pyarrow directly (not through chrono's reader)."""
    return ds.dataset(root / name, format="parquet", partitioning="hive").to_table().to_pylist()


def test_round_trip_every_value_equals_the_store(store, tmp_path, capsys):
    assert main(["--root", str(store), "export", "tensorboard", RUN, "--logdir", str(tmp_path)]) == 0
    assert "exported exp" in capsys.readouterr().out
    got = _read_back(tmp_path / RUN)
    metrics = [f.name for f in SNAPSHOTS if f.name not in
               ("run_id", "step", "window_start", "window_end", "layer")]
    snaps = _table(store, "snapshots")
    assert len(snaps) == (STEPS // 5) * (LAYERS + 1)
    expected = {}
    for r in snaps:
        lt = "all" if r["layer"] == -1 else f"layer_{r['layer']}"
        for m in metrics:
            expected[(f"chrono/{m}/{lt}", r["step"])] = float(r[m])
    for r in _table(store, "decisions"):
        for f in ("debt", "pressure", "heat", "forgetting", "lens_scale", "backoff", "abstain"):
            expected[(f"chrono/decision/{f}/layer_{r['layer']}", r["step"])] = float(r[f])
    for r in _table(store, "signals"):
        layer = "" if r["layer"] is None else f"/layer_{r['layer']}"
        expected[(f"chrono/signal/{r['name']}{layer}/rank_{r['rank']}", r["step"])] = r["value"]
    scalars = {k: v for k, v in got.items() if k[0] != "chrono/alerts"}
    assert scalars.keys() == expected.keys()
    assert all(scalars[k] == expected[k] for k in expected)   # exact: float64 on both sides
    assert ("chrono/neff/layer_2", 39) in scalars and ("chrono/dead/all", 4) in scalars
    alerts = _table(store, "alerts")
    texts = {k: v for k, v in got.items() if k[0] == "chrono/alerts"}
    assert sorted({s for _, s in texts}) == sorted({r["step"] for r in alerts})
    for r in alerts:
        assert f"layer {r['layer']}: {r['alert']} {r['transition']}" in texts[("chrono/alerts", r["step"])]


def test_second_export_needs_overwrite_and_replaces(store, tmp_path, capsys):
    args = ["--root", str(store), "export", "tensorboard", RUN, "--logdir", str(tmp_path)]
    assert main(args) == 0
    first = sorted((tmp_path / RUN).iterdir())
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert sorted((tmp_path / RUN).iterdir()) == first
    (tmp_path / RUN / "events.out.tfevents.123.host.1.0").write_bytes(b"")   # someone else's file
    assert main(args + ["--overwrite"]) == 0
    files = sorted(p.name for p in (tmp_path / RUN).iterdir())
    assert len(files) == 2 and "events.out.tfevents.123.host.1.0" in files
    assert first[0].name not in files
    assert len(_read_back(tmp_path / RUN)) > 0


@pytest.mark.parametrize("args,needle", [
    (["export", "tensorboard", "nope", "--logdir", "X"], "unknown run 'nope'"),
    (["export", "tensorboard", "a/b", "--logdir", "X"], "invalid run id"),
    (["export", "tensorboard", RUN], "--logdir"),
    (["export", "csv", RUN, "--logdir", "X"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(store, tmp_path, capsys, args, needle):
    args = [a.replace("X", str(tmp_path / "tb")) for a in args]
    with pytest.raises(SystemExit) if needle in ("--logdir", "invalid choice") else _nothing() as ex:
        rc = main(["--root", str(store)] + args)
    rc = ex.value.code if hasattr(ex, "value") else rc
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (tmp_path / "tb").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_logdir_that_is_a_file_is_refused(store, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["--root", str(store), "export", "tensorboard", RUN, "--logdir", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_export_and_rm_import_no_torch(store, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "copy"
    shutil.copytree(store, root)
    code = ("import sys\nfrom chrono_cli.main import main\n"
            f"assert main(['--root', {str(root)!r}, 'export', 'tensorboard', 'exp', '--logdir', "
            f"{str(tmp_path / 'tb')!r}]) == 0\n"
            f"assert main(['--root', {str(root)!r}, 'rm', 'exp', '--yes']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.returncode == 0, p.stderr
    assert chrono.store.list_runs(root) == []
