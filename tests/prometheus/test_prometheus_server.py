"""Against a real Prometheus server: it scrapes the exporter, its API returns the store's values,
and it loads and evaluates the shipped alert rules. Also promtool on the shipped files."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from chrono.exporters.prometheus import StoreSource, serve
from tests.conftest import free_port, require_tool
from tests.prometheus.conftest import EVERY

pytestmark = pytest.mark.prometheus

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "chrono_rules.yml"
EXAMPLE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES_TEST = Path(__file__).with_name("chrono_rules_test.yml")


def await_condition(fn, timeout=60.0, what="condition", proc=None):
    """Poll ``fn`` until it returns a truthy value (short waits between polls, bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode} while waiting for {what}")
        try:
            last = fn()
        except OSError as e:  # server not listening yet
            last = e
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def api(base, path, **params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def instant(base, query) -> dict:
    """{frozenset(labels without __name__/job/instance): float value}."""
    data = api(base, "/api/v1/query", query=query)
    out = {}
    for item in data["result"]:
        labels = {k: v for k, v in item["metric"].items() if k not in ("__name__", "job", "instance")}
        out[frozenset(labels.items())] = float(item["value"][1])
    return out


@pytest.fixture
def prometheus_server(tmp_path):
    """Start ``prometheus`` on 127.0.0.1 with a temp config; yields (start(targets) -> base url)."""
    binary = require_tool("prometheus")
    procs = []

    def start(target: str) -> tuple[str, subprocess.Popen]:
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            "scrape_configs:\n  - job_name: chrono\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        log = open(tmp_path / "prometheus.log", "w")
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        base = f"http://127.0.0.1:{port}"
        await_condition(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=5).status == 200,
                        what="prometheus /-/ready", proc=proc)
        return base, proc

    yield start
    for proc, log in procs:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prometheus_scrapes_the_store_values(run_builder, store_truth, prometheus_server):
    root, run = run_builder.root, run_builder.run
    with serve(StoreSource(root, run), port=0) as exporter:
        base, proc = prometheus_server(f"127.0.0.1:{exporter.port}")
        truth = store_truth(root, run)
        step = next(iter(truth["snapshot"].values()))["step"]
        await_condition(lambda: instant(base, "chrono_snapshot_step") == {frozenset({("run", run)}): step},
                        what="a scrape of the exporter", proc=proc)
        assert instant(base, 'up{job="chrono"}') == {frozenset(): 1.0}

        def per_layer(values):
            return {frozenset({("run", run), ("layer", str(l))}): float(v) for l, v in values.items()}

        snap = truth["snapshot"]
        for metric, col in [("chrono_neff", "neff"), ("chrono_top2_share", "top2_share"),
                            ("chrono_entropy_nats", "entropy"), ("chrono_dead_experts", "dead"),
                            ("chrono_nearly_dead_experts", "nearly_dead"), ("chrono_load_cv", "cv"),
                            ("chrono_max_violation", "max_violation")]:
            assert instant(base, metric) == per_layer({l: r[col] for l, r in snap.items()}), metric
        assert instant(base, "chrono_tokens_routed_total") == per_layer(truth["tokens"])
        active = instant(base, "chrono_alert_active == 1")
        assert {(dict(k)["layer"], dict(k)["alert"]) for k in active} == {
            (str(l), a) for l, a in truth["active"]}
        assert instant(base, "chrono_controller_pressure") == {
            frozenset({("run", run), ("layer", str(l)), ("actuator", "lens")}): d["pressure"]
            for l, d in truth["decisions"].items()}

        # the shipped rules are loaded and evaluate without errors on real data
        groups = await_condition(
            lambda: [g for g in api(base, "/api/v1/rules")["groups"]
                     if all(r.get("lastEvaluation", "").startswith("20") for r in g["rules"])],
            what="rule evaluation", proc=proc)
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert {"ChronoPreCollapse", "ChronoCollapseConfirmed", "ChronoDeadExperts",
                "ChronoExporterDown", "ChronoTelemetryStale"} <= set(rules)
        assert all(r["health"] == "ok" for r in rules.values()), rules
        confirmed = {str(l) for l, a in truth["active"] if a == "COLLAPSE_CONFIRMED"}
        assert confirmed, "fixture should confirm a collapse"
        # COLLAPSE_CONFIRMED mirrors have `for: 0m`: they fire on the next evaluation
        firing = await_condition(
            lambda: {a["labels"]["layer"] for a in api(base, "/api/v1/alerts")["alerts"]
                     if a["labels"]["alertname"] == "ChronoCollapseConfirmed" and a["state"] == "firing"},
            what="ChronoCollapseConfirmed firing", proc=proc)
        assert firing == confirmed

        # new windows written to the store reach Prometheus through the exporter
        run_builder.add_windows(2)
        new_step = step + 2 * EVERY
        assert store_truth(root, run)["snapshot"][0]["step"] == new_step
        await_condition(lambda: instant(base, "chrono_snapshot_step") == {frozenset({("run", run)}): new_step},
                        what="the new snapshot in Prometheus", proc=proc)
        assert instant(base, "chrono_neff") == per_layer(
            {l: r["neff"] for l, r in store_truth(root, run)["snapshot"].items()})


def test_promtool_accepts_the_shipped_rules_and_config():
    promtool = require_tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(EXAMPLE_CONFIG)],
                 ["test", "rules", str(RULES_TEST)]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"


def test_serve_metrics_without_run_exports_two_concurrent_runs(run_builder, store_truth, prometheus_server):
    """`chrono serve-metrics` (no --run) while two runs record: Prometheus holds both, each under its
    run label with its own store values; a scratch run written later does not hide them."""
    import os
    import sys

    from tests.prometheus.conftest import RunBuilder

    root = run_builder.root
    healthy = RunBuilder(root, run="calm", n_layers=1, seed=3)  # one layer, no drift: stays healthy
    healthy.add_windows(2)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = subprocess.Popen([sys.executable, "-m", "chrono_cli", "--root", str(root), "serve-metrics",
                            "--port", str(port), "--recent", "15m"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = cli.stdout.readline()
        assert "written within 15m" in banner and "calm" in banner and "exp1" in banner, banner
        base, proc = prometheus_server(f"127.0.0.1:{port}")

        def steps_now():
            return {dict(k)["run"]: v for k, v in instant(base, "chrono_snapshot_step").items()}

        def expect_steps():
            return {r: float(next(iter(store_truth(root, r)["snapshot"].values()))["step"])
                    for r in ("exp1", "calm")}

        await_condition(lambda: steps_now() == expect_steps(), what="both runs scraped", proc=proc)
        for i in range(2):  # both runs keep recording, interleaved, while Prometheus scrapes
            run_builder.add_windows(1)
            healthy.add_windows(1)
            await_condition(lambda: steps_now() == expect_steps(), what=f"round {i} of new windows", proc=proc)
        for run in ("exp1", "calm"):
            truth = store_truth(root, run)
            assert instant(base, f'chrono_neff{{run="{run}"}}') == {
                frozenset({("run", run), ("layer", str(l))}): float(r["neff"]) for l, r in truth["snapshot"].items()}
        confirmed = {("exp1", str(l)) for l, a in store_truth(root, "exp1")["active"] if a == "COLLAPSE_CONFIRMED"}
        assert confirmed
        firing = await_condition(
            lambda: {(a["labels"]["run"], a["labels"]["layer"]) for a in api(base, "/api/v1/alerts")["alerts"]
                     if a["labels"]["alertname"] == "ChronoCollapseConfirmed" and a["state"] == "firing"},
            what="ChronoCollapseConfirmed firing", proc=proc)
        assert firing == confirmed  # the collapsing run alerts, the healthy one does not

        scratch = RunBuilder(root, run="scratch", n_layers=1, seed=4)  # the user records a scratch run
        scratch.add_windows(1)
        await_condition(lambda: set(steps_now()) == {"exp1", "calm", "scratch"}, what="the scratch run", proc=proc)
        assert {dict(k)["run"] for k in instant(base, "chrono_neff")} == {"exp1", "calm", "scratch"}
        assert instant(base, "chrono_exporter_runs") == {frozenset(): 3.0}
    finally:
        cli.terminate()
        cli.wait(timeout=20)
