"""DESIGN §4 numeric examples for the pure governance policy (no torch)."""
import sys

import numpy as np
import pytest

from chrono import metrics as M
from chrono.controller import policy as P


def _debt_of_shares(shares):
    m = M.summarize(np.asarray(shares) * 1000)
    return P.topology_debt(m.neff, m.top2_share, m.dead, m.n_experts)


@pytest.mark.parametrize("shares,expected", [
    ([.5, .5, 0, 0], 0.6),
    ([1, 0, 0, 0], 0.8333333333333334),
    ([.7, .1, .1, .1], 0.08),
    ([.25, .25, .25, .25], 0.0),
])
def test_topology_debt_examples(shares, expected):
    assert _debt_of_shares(shares) == pytest.approx(expected, abs=1e-12)


def test_debt_is_clipped_and_handles_degenerate_n():
    assert P.topology_debt(neff=1, top2_share=1.0, dead=99, n_experts=2) <= 1.0
    assert P.topology_debt(1, 1.0, 0, 0) == 0.0


def test_pressure_sequence_from_zero():
    p, seq = 0.0, []
    for _ in range(3):
        p = P.next_pressure(p, 0.6)
        seq.append(p)
    assert seq == pytest.approx([0.12, 0.216, 0.2928], abs=1e-12)


def test_heat_and_forgetting():
    assert P.heat(0.3) == 0.3 and P.heat(-1) == 0.0 and P.heat(2) == 1.0
    assert P.forgetting(0.0) == pytest.approx(0.02)
    assert P.forgetting(0.5) == pytest.approx(0.07)


def test_s_max_switches_at_step_100():
    assert P.s_max(99) == 0.02 and P.s_max(100) == 0.5
    assert P.lens_scale(0.3, 99, 1.0) == pytest.approx(0.02)
    assert P.lens_scale(0.3, 100, 1.0) == pytest.approx(0.3)
    assert P.lens_scale(0.9, 500, 1.0) == pytest.approx(0.5)   # min(pressure, 0.5)
    assert P.lens_scale(0.3, 500, 0.5) == pytest.approx(0.15)  # times backoff


def test_harm_guard_halves_then_recovers():
    b = P.next_backoff(1.0, prev_top2=0.70, top2=0.75, prev_scale=0.2)   # Top2 +0.05 after s=0.2
    assert b == 0.5
    b = P.next_backoff(b, prev_top2=0.75, top2=0.75, prev_scale=0.1)     # no harm: recover
    assert b == pytest.approx(0.5 + 0.2 * 0.5)
    # no halving when the applied scale was small (<= 0.01) or the rise small (<= 0.02)
    assert P.next_backoff(1.0, 0.70, 0.80, prev_scale=0.01) == 1.0
    assert P.next_backoff(0.5, 0.70, 0.715, prev_scale=0.3) == pytest.approx(0.6)
    assert P.next_backoff(0.5, None, 0.9, prev_scale=0.3) == pytest.approx(0.6)


def test_abstain_rules():
    assert P.abstain_reason(0.14, 0.5).startswith("abstain: backoff")
    assert P.abstain_reason(1.0, 0.009).startswith("abstain: pressure")
    assert P.abstain_reason(0.15, 0.01) is None


def test_policy_imports_no_torch():
    import subprocess

    code = ("import sys; import chrono.controller, chrono.controller.policy, chrono_cli.commands.replay; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_replay_command_runs_without_torch(tmp_path):
    """`chrono replay` on a missing run fails cleanly (exit 2) and never loads torch."""
    import subprocess

    code = ("import sys; from chrono_cli.main import main; rc = main(['--root', sys.argv[1], 'replay', 'nope']); "
            "sys.exit(10 + rc if 'torch' not in sys.modules else 99)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 12, r.stderr
    assert "chrono: error:" in r.stderr and "Traceback" not in r.stderr
