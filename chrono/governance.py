"""``chrono.govern``: wire a Controller and actuators to a probes Handle.

    with probes.attach(model, run="exp1", flush_every=10) as h:
        gov = chrono.govern(model, h, actuators=("bias", "aux"))
        for batch in data:
            loss = lm_loss + sum(gov.aux_weight(l) * aux[l] for l in aux)   # only with "aux"
            loss.backward(); opt.step(); h.step(); gov.step()

At every snapshot (``h.on_snapshot``) the controller decides per layer, each
actuator of that layer applies the decision, and the decisions are logged to
the store (``h.record_decisions``) and mirrored to ``control_decisions.jsonl``
in the run directory. The policy config goes to ``control_config.json`` there,
so ``chrono replay RUN`` can re-derive every decision from the snapshots.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .actuators import (Actuator, ActuatorError, AuxLossActuator, InformedLensActuator,
                        LensActuator, RouterBiasActuator, TemperatureActuator)
from .controller import CONFIG_NAME, JSONL_NAME, ControlConfig, ControlDecision, Controller

ACTUATORS = ("lens", "informed-lens", "bias", "temperature", "aux")


def _site(site, key):
    return site[key] if isinstance(site, dict) else getattr(site, key)


def build_actuators(name: str, router: nn.Module, layer: int, n_experts: int,
                    lens: nn.Module | None = None, **kw) -> Actuator:
    """One actuator by name for one router (kwargs go to its constructor)."""
    if name == "lens":
        return LensActuator(router, layer, lens=lens, hook=lens is None, **kw)
    if name == "informed-lens":
        return InformedLensActuator(router, layer, n_experts, **kw)
    if name == "bias":
        return RouterBiasActuator(router, layer, n_experts, **kw)
    if name == "temperature":
        return TemperatureActuator(router, layer, **kw)
    if name == "aux":
        return AuxLossActuator(layer, **kw)
    raise ActuatorError(f"unknown actuator {name!r}; choose from {', '.join(ACTUATORS)}")


class Governor:
    """Controller + actuators for a set of routers; feed it snapshot rows with ``observe``."""

    def __init__(self, routers: dict[int, tuple[nn.Module, int]], actuators=("informed-lens",),
                 config: ControlConfig | None = None, lenses: dict | None = None,
                 actuator_kwargs: dict | None = None, run_dir: Path | None = None):
        names = (actuators,) if isinstance(actuators, str) else tuple(actuators)
        if not names:
            raise ActuatorError("give at least one actuator")
        config = config or ControlConfig(actuator="+".join(names))
        layers = sorted(routers)
        self.controller = Controller(len(layers), {l: routers[l][1] for l in layers}, config)
        self.actuators: dict[int, list[Actuator]] = {}
        kw = actuator_kwargs or {}
        for l in layers:
            router, n = routers[l]
            self.actuators[l] = [build_actuators(a, router, l, n, lens=(lenses or {}).get(l),
                                                 **kw.get(a, {})) for a in names]
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.decisions: list[ControlDecision] = []
        if self.run_dir is not None:
            (self.run_dir / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))

    def observe(self, step: int, rows: list[dict]) -> list[ControlDecision]:
        """Decide for one snapshot window and apply every decision."""
        decisions = self.controller.update(rows)
        for d in decisions:
            for a in self.actuators.get(d.layer, ()):
                a.act(d)
        self.decisions.extend(decisions)
        if self.run_dir is not None and decisions:
            run_id = rows[0].get("run_id") if rows else None
            with open(self.run_dir / JSONL_NAME, "a") as f:
                for d in decisions:
                    f.write(json.dumps(d.as_row(run_id)) + "\n")
        return decisions

    def step(self) -> None:
        """Call once per training step (after the optimizer step): per-step actuators."""
        for acts in self.actuators.values():
            for a in acts:
                a.on_step()

    def aux_weight(self, layer: int) -> float:
        """Coefficient for this layer's aux loss (0 without an ``aux`` actuator)."""
        return sum(a.alpha for a in self.actuators.get(layer, ()) if isinstance(a, AuxLossActuator))

    def remove(self) -> None:
        for acts in self.actuators.values():
            for a in acts:
                a.remove()


def govern(model: nn.Module, handle, actuators=("informed-lens",), config: ControlConfig | None = None,
           lenses: dict | None = None, actuator_kwargs: dict | None = None) -> Governor:
    """Attach a governor to ``handle`` (a probes Handle) for every router it found in ``model``.

    ``lenses``: lenses already applied by ``probes.attach(..., lenses=...)``; the
    ``lens`` actuator then only sets their scale instead of hooking new ones.
    """
    routers = {}
    for site in handle.routers:
        layer, name = int(_site(site, "layer")), _site(site, "name")
        routers[layer] = (model.get_submodule(name), int(_site(site, "n_experts")))
    writer = getattr(handle, "writer", None)
    # multi-rank: every rank decides identically, rank 0 alone mirrors the decisions to disk
    run_dir = getattr(writer, "path", None) if getattr(writer, "rank", 0) == 0 else None
    if not isinstance(run_dir, (str, Path)) or not Path(run_dir).is_dir():
        run_dir = None   # telemetry is off (probes' null writer): decisions stay in memory only
    gov = Governor(routers, actuators, config, lenses, actuator_kwargs, run_dir)

    def _on_snapshot(step, rows, h):
        decisions = gov.observe(step, rows)
        h.record_decisions([d.as_row(h.run_id) for d in decisions])

    handle.on_snapshot(_on_snapshot)
    return gov
