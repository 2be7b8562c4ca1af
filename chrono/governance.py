"""``chrono.govern``: wire a Controller and actuators to a probes Handle.

    with probes.attach(model, run="exp1", flush_every=10) as h:
        gov = chrono.govern(model, h, actuators=("bias", "aux"),
                            config=ControlConfig(mode="setpoint", neff_target=0.8))
        for batch in data:
            loss = lm_loss + gov.aux_loss()      # only with "aux": α_l · Switch aux, every layer
            loss.backward(); opt.step(); h.step(); gov.step()

At every snapshot (``h.on_snapshot``) the controller decides per layer, each
actuator of that layer applies the decision, and the decisions are logged to
the store (``h.record_decisions``) and mirrored to ``control_decisions.jsonl``
in the run directory. The policy config goes to ``control_config.json`` there,
so ``chrono replay RUN`` can re-derive every decision from the snapshots.

What ``govern`` needs from the handle is the ``GovernedHandle`` protocol (a probes
``Handle`` satisfies it; chrono never imports probes). A handle that is also a
``chrono.router_loads.RouterLoads`` hands the bias and informed-lens actuators the
router loads it already counts (no counting hook of theirs), and one with a ``hooks``
registry (``chrono.hooks.HookRegistry``) unwinds the governor with its own hooks at detach.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from torch import nn

from .actuators import (Actuator, ActuatorError, AuxLossActuator, InformedLensActuator,
                        LensActuator, RouterBiasActuator, TemperatureActuator)
from .control_history import reconcile_mirror, stored_history
from .controller import CONFIG_NAME, JSONL_NAME, ControlConfig, ControlDecision, Controller, read_config
from .hooks import HookRegistry
from .router_loads import HookLoads, RouterLoads

ACTUATORS = ("lens", "informed-lens", "bias", "temperature", "aux")
NEEDS_LOAD = ("informed-lens", "bias")   # actuators that read a LoadCursor
_GOVERNORS = weakref.WeakKeyDictionary()   # handle -> its latest Governor (one at a time)


class GovernedHandle(Protocol):
    """What ``govern`` uses of a probes ``Handle`` (tests use a fake one).

    ``routers``: objects or dicts with ``layer``, ``name`` (dotted module path) and
    ``n_experts``; ``run_id``; ``writer`` (optional: the store writer, whose ``path`` and
    ``rank`` say where decisions are mirrored); ``on_snapshot(fn)`` registers
    ``fn(step, rows, handle)``; ``record_decisions(rows)`` logs DECISIONS rows. Optional:
    ``load_cursor(layer)`` (``RouterLoads``), ``hooks`` (``HookRegistry``) and ``wait_written()``
    (block until closed windows are in the store: the warm start of a resumed run reads them).
    """

    routers: list
    run_id: str

    def on_snapshot(self, fn): ...

    def record_decisions(self, rows: list[dict]) -> None: ...


def _site(site, key):
    return site[key] if isinstance(site, dict) else getattr(site, key)


def build_actuators(name: str, router: nn.Module, layer: int, n_experts: int,
                    lens: nn.Module | None = None, loads=None, **kw) -> Actuator:
    """One actuator by name for one router (kwargs go to its constructor).

    ``loads``: a ``chrono.router_loads.LoadCursor`` over this router for the actuators
    in ``NEEDS_LOAD`` (None: they count with a hook of their own).
    Raises ActuatorError for an unknown name or a router the actuator cannot steer.
    """
    if name == "lens":
        return LensActuator(router, layer, lens=lens, hook=lens is None, n_experts=n_experts, **kw)
    if name == "informed-lens":
        return InformedLensActuator(router, layer, n_experts, loads=loads, **kw)
    if name == "bias":
        return RouterBiasActuator(router, layer, n_experts, loads=loads, **kw)
    if name == "temperature":
        return TemperatureActuator(router, layer, **kw)
    if name == "aux":
        return AuxLossActuator(layer, router=router, n_experts=n_experts, **kw)
    raise ActuatorError(f"unknown actuator {name!r}; choose from {', '.join(ACTUATORS)}")


class Governor:
    """Controller + actuators for a set of routers; feed it snapshot rows with ``observe``.

    ``config.actuator`` is set to the actuators' label (``"bias+aux"``), so the
    decisions say who consumed them and which signals were informational.
    Set-up is all or nothing: if any actuator cannot be built (ActuatorError),
    the ones already installed are removed before the error propagates.

    ``loads``: where load-reading actuators get router loads (``RouterLoads``, e.g. a
    probes handle); None: one shared counting hook per router (``HookLoads``).
    ``hooks``: a registry that adopts the governor, so its ``remove()`` (a probes
    handle's detach) removes the governor too.
    ``history``: snapshot windows the run's controller saw before (``chrono.control_history``):
    fed to a new controller first (warm start). ``takes_over``: the handle's removed governor,
    whose controller (and config) this one continues. ``config_dir``: a run directory whose
    ``control_config.json`` binds (the run has stored decisions). Another config than the
    bound one raises ActuatorError (``check_same_config``).
    """

    def __init__(self, routers: dict[int, tuple[nn.Module, int]], actuators=("informed-lens",),
                 config: ControlConfig | None = None, lenses: dict | None = None,
                 actuator_kwargs: dict | None = None, run_dir: Path | None = None,
                 loads: RouterLoads | None = None, hooks: HookRegistry | None = None,
                 history: list | None = None, takes_over: "Governor | None" = None,
                 config_dir: Path | None = None):
        names = (actuators,) if isinstance(actuators, str) else tuple(actuators)
        if not names:
            raise ActuatorError("give at least one actuator")
        unknown = [a for a in names if a not in ACTUATORS]
        if unknown:
            raise ActuatorError(f"unknown actuator(s) {unknown}; choose from {', '.join(ACTUATORS)}")
        twice = sorted({a for a in names if names.count(a) > 1})
        if twice:
            raise ActuatorError(f"actuator {twice[0]!r} given twice; name each actuator once")
        config = replace(config or ControlConfig(), actuator="+".join(names))
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.removed = False
        previous = takes_over.controller.config if takes_over is not None else None
        check_same_config(Path(config_dir) if config_dir is not None else None, config, previous)
        layers = sorted(routers)
        if takes_over is not None:      # the handle's earlier governor: its controller goes on
            self.controller, self.latest = takes_over.controller, dict(takes_over.latest)
        else:
            self.controller = Controller(len(layers), {l: routers[l][1] for l in layers}, config)
            self.latest: dict[int, ControlDecision] = {}
            for window in history or ():   # warm start: the windows this run's controller saw
                self.latest.update((d.layer, d) for d in self.controller.update(window))
        self.actuators: dict[int, list[Actuator]] = {}
        self._own_loads = None
        if loads is None and any(a in NEEDS_LOAD for a in names):
            loads = self._own_loads = HookLoads(routers)
        kw = actuator_kwargs or {}
        self._parent = None
        try:
            for l in layers:
                router, n = routers[l]
                self.actuators[l] = []
                for a in names:
                    cursor = loads.load_cursor(l) if a in NEEDS_LOAD else None
                    self.actuators[l].append(build_actuators(a, router, l, n, lens=(lenses or {}).get(l),
                                                             loads=cursor, **kw.get(a, {})))
        except BaseException:
            self.remove()
            raise
        # a continued controller: each layer's last decision; a new one: the bumpless start
        start = list(self.latest.values()) if self.latest else self.controller.initial_decisions()
        for d in start:
            for a in self.actuators.get(d.layer, ()):
                a.act(d)
        self.decisions: list[ControlDecision] = []
        if self.run_dir is not None:
            (self.run_dir / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))
        if hooks is not None:   # the handle's detach removes the governor too
            hooks.adopt(self)
            self._parent = hooks
        self.superseded = False
        if takes_over is not None:
            takes_over.superseded = True   # it stops following windows: this one does now

    def observe(self, step: int, rows: list[dict]) -> list[ControlDecision]:
        """Decide for one snapshot window and apply every decision.

        After ``remove()`` the controller still follows the windows (its state stays the
        run's, for a governor that takes over) but nothing is applied or logged: returns []."""
        if self.superseded:
            return []
        decisions = self.controller.update(rows)
        self.latest.update((d.layer, d) for d in decisions)
        if self.removed:
            return []
        for d in decisions:
            for a in self.actuators.get(d.layer, ()):
                a.act(d)
        self.decisions.extend(decisions)
        if self.run_dir is not None and decisions:
            run_id = rows[0].get("run_id") if rows else None
            with open(self.run_dir / JSONL_NAME, "a") as f:
                for d in decisions:
                    f.write(json.dumps(d.as_record(run_id)) + "\n")
        return decisions

    def step(self) -> None:
        """Call once per training step (after the optimizer step): per-step actuators."""
        for acts in self.actuators.values():
            for a in acts:
                a.on_step()

    def aux_weight(self, layer: int) -> float:
        """Coefficient for this layer's aux loss (0 without an ``aux`` actuator)."""
        return sum(a.alpha for a in self.actuators.get(layer, ()) if isinstance(a, AuxLossActuator))

    def aux_loss(self):
        """Σ over layers of α_l · Switch aux loss of the forwards since the last call (a scalar
        tensor with graph; 0.0 without ``aux`` actuators). Add it to the training loss."""
        total = 0.0
        for acts in self.actuators.values():
            for a in acts:
                if isinstance(a, AuxLossActuator):
                    total = total + a.loss()
        return total

    def remove(self) -> None:
        """Remove every actuator's hooks (last installed first); no decision is applied or
        logged afterwards. Safe to call twice."""
        self.removed = True
        for acts in reversed(list(self.actuators.values())):
            for a in reversed(acts):
                a.remove()
        self.actuators = {}
        if self._own_loads is not None:
            self._own_loads.remove()
        if self._parent is not None:
            self._parent.release(self)
            self._parent = None


def check_same_config(run_dir: Path | None, config: ControlConfig,
                      previous: ControlConfig | None = None) -> None:
    """Refuse to govern a run already governed with another ``ControlConfig``.

    A run has one controller (``chrono.control_history``): its stored decisions are
    re-derived from ``control_config.json``, which a second configuration would replace.
    ``previous``: the config of the handle's earlier governor; else the run's stored file.
    Raises ActuatorError naming the first field that differs.
    """
    old = previous.to_dict() if previous is not None else None
    if old is None and run_dir is not None:
        try:
            old = read_config(run_dir)
        except ValueError:
            old = None   # unreadable or not an object: replay says so; governing may go on
    new = json.loads(json.dumps(config.to_dict()))
    if old is None or old == new:
        return
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    field = diff[0] if diff else "?"
    raise ActuatorError(
        f"this run was governed with another configuration ({field}: {old.get(field)!r}, now "
        f"{new.get(field)!r}); a run has one controller, so govern it with the same actuators "
        f"and ControlConfig, or record into a new run")


def _governor_of(handle) -> "Governor | None":
    """The handle's latest Governor (None: none, or a handle that cannot be weakly keyed)."""
    try:
        return _GOVERNORS.get(handle)
    except TypeError:
        return None


def _routers(model: nn.Module, handle) -> dict[int, tuple[nn.Module, int]]:
    """``{layer: (router module in model, n_experts)}`` for the handle's routers; ActuatorError
    when ``model`` is not the model the handle is attached to."""
    routers = {}
    for site in handle.routers:
        layer, name = int(_site(site, "layer")), _site(site, "name")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ActuatorError(f"the model has no module {name!r}, a router of run {handle.run_id!r}: "
                                f"govern(model, h) needs the model h is attached to") from None
        attached = site.get("module") if isinstance(site, dict) else getattr(site, "module", None)
        if attached is not None and attached is not module:
            raise ActuatorError(f"{name} of this model is not the router the handle of run "
                                f"{handle.run_id!r} records: not the model it is attached to")
        routers[layer] = (module, int(_site(site, "n_experts")))
    return routers


def _discard_if_empty(handle) -> None:
    """After a failed set-up: detach ``handle`` and delete its run if the run holds nothing.

    Nothing = this handle took no step and wrote no row, no part file of the run
    exists in any table (a resumed run keeps its data) and its metadata directory
    holds only the manifest and lock files. Multi-rank runs are never deleted.
    """
    from .schema import TABLES
    from .store import delete_run, part_files

    writer = getattr(handle, "writer", None)
    root, run = getattr(writer, "root", None), getattr(writer, "run_id", None)
    if not isinstance(root, Path) or run is None or getattr(writer, "world_size", 1) != 1:
        return   # telemetry off (probes' null writer) or several ranks: nothing of ours to clean
    stats = handle.stats() if hasattr(handle, "stats") else {"steps": 1}
    if stats.get("steps") or sum((stats.get("rows_written") or {}).values()) or writer.pending_rows():
        return
    if any(part_files(root, t, run) for t in TABLES):
        return
    meta = Path(writer.path)
    if any(p.name != "manifest.json" and not p.name.startswith(".") for p in meta.iterdir()):
        return
    handle.detach()
    delete_run(root, run)


def govern(model: nn.Module, handle: GovernedHandle, actuators=("informed-lens",),
           config: ControlConfig | None = None, lenses: dict | None = None,
           actuator_kwargs: dict | None = None) -> Governor:
    """Attach a governor to ``handle`` (a probes Handle) for every router it found in ``model``.

    The actuators read router loads from the handle when it offers them (``load_cursor``),
    and the handle's detach removes the governor when it has a ``hooks`` registry.

    ``actuators``: names from ``ACTUATORS``; ``config``: e.g.
    ``ControlConfig(mode="setpoint", neff_target=0.8)`` (default: the faithful policy).
    ``lenses``: lenses already applied by ``probes.attach(..., lenses=...)``; the
    ``lens`` actuator then only sets their scale instead of hooking new ones.
    Raises ActuatorError when an actuator cannot steer a router (or is unknown);
    then nothing is left behind: no actuator hook, and when the handle has
    recorded nothing yet (no step, no row) it is detached and its empty run deleted.
    """
    if getattr(handle, "detached", False) is True:
        raise ActuatorError(f"the handle of run {handle.run_id!r} is detached (its `with probes.attach(...)` "
                            f"block ended): call govern inside the block")
    previous = _governor_of(handle)
    if previous is not None and not previous.removed:
        raise ActuatorError(f"run {handle.run_id!r} is already governed through this handle (actuators "
                            f"{previous.controller.config.actuator}); call gov.remove() first")
    writer = getattr(handle, "writer", None)
    meta = getattr(writer, "path", None)
    if not isinstance(meta, (str, Path)) or not Path(meta).is_dir():
        meta = None      # telemetry is off (probes' null writer): decisions stay in memory only
    # multi-rank: every rank decides identically, rank 0 alone mirrors the decisions to disk
    run_dir = meta if getattr(writer, "rank", 0) == 0 else None
    try:
        routers = _routers(model, handle)
        first, history = None, None
        if previous is None and meta is not None and isinstance(getattr(writer, "root", None), Path):
            if callable(getattr(handle, "wait_written", None)):
                handle.wait_written()   # windows this session closed are still being written
            first, history = stored_history(writer.root, handle.run_id)   # a resumed governed run
            if run_dir is not None:   # mirror lines of windows a killed process never stored
                reconcile_mirror(writer.root, handle.run_id, Path(run_dir) / JSONL_NAME)
        loads = handle if isinstance(handle, RouterLoads) else None
        # the stored config binds only while stored decisions derive from it (an overwrite from
        # step 0 removed them all)
        gov = Governor(routers, actuators, config, lenses, actuator_kwargs, run_dir, loads=loads,
                       hooks=getattr(handle, "hooks", None), history=history, takes_over=previous,
                       config_dir=meta if first is not None else None)
    except BaseException:
        _discard_if_empty(handle)
        raise
    try:
        _GOVERNORS[handle] = gov
    except TypeError:   # unhashable or not weakly referenceable: no one-per-handle bookkeeping
        pass

    def _on_snapshot(step, rows, h):
        decisions = gov.observe(step, rows)
        if decisions:
            h.record_decisions([d.as_row(h.run_id) for d in decisions])

    handle.on_snapshot(_on_snapshot)
    return gov
