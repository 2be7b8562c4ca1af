"""newcomer2: the controller gauges' HELP holds for both policies (faithful and setpoint)."""
from chrono.exporters.collector import DECISION_GAUGES


def test_pressure_help_names_the_setpoint_effort():
    # HELP said "Controller pressure (EMA of topology debt)." only; under the setpoint policy
    # the column holds the PI effort u, so a Grafana panel labelled from HELP was wrong there.
    helps = {name: text for name, _, text in DECISION_GAUGES}
    assert "EMA of topology debt" in helps["chrono_controller_pressure"]
    assert "setpoint" in helps["chrono_controller_pressure"] and "effort" in helps["chrono_controller_pressure"]
