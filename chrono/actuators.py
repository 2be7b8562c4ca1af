"""Actuators: what turns a controller decision into a change of routing (DESIGN §6).

One small interface, ``Actuator``: ``act(decision)`` applies one layer's
``ControlDecision`` (called once per snapshot window, in the training thread),
``on_step()`` does optional per-training-step work, ``remove()`` takes every
hook it added away. Each actuator reads one signal the policy computes
(``lens_scale``, ``pressure`` or ``heat``) so no signal is computed and thrown
away; ``forgetting`` is informational (logged only) in this version.

Actuators that need the router's load read it through a ``chrono.router_loads.
LoadCursor`` (``loads=``): under ``chrono.govern(model, handle)`` the counts the probes
handle already keeps; without one, a shared counting hook (``HookLoads``). Routers
follow the native protocol (``forward`` returns ``(logits, weights, indices[,
dropped])``), as HF transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3
routers do; the bias and temperature actuators reach those through
``chrono.router_hooks`` (no edit of the model). Every hook goes through a
``chrono.hooks.HookRegistry`` and ``remove()`` leaves the model exactly as found.

In ``setpoint`` mode (``ControlConfig.mode``) the bias, aux and temperature
actuators use the PI effort u in [0, 1] (the decision's ``pressure`` column) as
the fraction of their range; in ``faithful`` mode they use
clip(pressure / pressure_ref) as before.
"""
from __future__ import annotations

import torch
from torch import nn

from .controller import ControlDecision
from .controller import policy
from .hooks import HookRegistry
from .lens import ChronoLens
from .router_hooks import HookError, InputTemperature, SelectionBias, lens_pre_hook
from .router_loads import HookLoads, LoadCursor, routed_indices

__all__ = ["Actuator", "LensActuator", "InformedLensActuator", "RouterBiasActuator",
           "TemperatureActuator", "AuxLossActuator", "router_weight", "switch_aux_loss",
           "switch_balance_loss", "drive", "ActuatorError"]


class ActuatorError(ValueError):
    """The router lacks what an actuator needs (clear message, no traceback in the CLI)."""


def drive(decision: ControlDecision, pressure_ref: float) -> float:
    """Fraction of an actuator's range to use, in [0, 1].

    setpoint mode: the PI effort (stored as ``pressure``); faithful mode:
    clip(pressure / pressure_ref), ChronoMoE's pressure normalised by the
    actuator's reference pressure.
    """
    if decision.mode == "setpoint":
        return policy.clip(decision.pressure)
    return policy.clip(decision.pressure / pressure_ref)


def switch_balance_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int,
                        alpha: float = 1.0) -> torch.Tensor:
    """Switch load-balancing loss α·E·Σ_i f_i·P_i (Fedus et al. 2021, arXiv:2101.03961, eq. 4);
    the one implementation every chrono actuator and reference model trains with.

    probs [T, E] float: the router's probability of each expert per token (with graph: the
    gradient flows through P only); indices [T, k] int in [0, E): the experts really chosen
    (pass ``indices[:, :1]`` for the paper's top-1 f). f_i = share of the T·k assignments sent
    to expert i (no gradient), P_i = mean probability of expert i over the T tokens. Returns a
    scalar of ``probs``' dtype; α when perfectly balanced, α·E when one expert takes every
    assignment with probability 1.
    """
    E = int(n_experts)
    idx = indices.reshape(-1).long()
    f = torch.zeros(E, device=probs.device).scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    f = f / max(1, idx.numel())
    p = probs.reshape(-1, E).mean(0)
    return (alpha * E) * (f.detach() * p).sum()


def switch_aux_loss(logits: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``switch_balance_loss`` of ``softmax(logits)``: logits [T, E] (any float dtype, taken
    as float32), indices [T, k]. Returns a float32 scalar; 1.0 when perfectly balanced."""
    E = int(n_experts)
    return switch_balance_loss(torch.softmax(logits.reshape(-1, E).float(), dim=-1), indices, E)


def router_weight(router: nn.Module, n_experts: int) -> torch.Tensor:
    """The router's projection weight ``[n_experts, d_model]`` (its own or its first matching Linear)."""
    w = getattr(router, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == n_experts:
        return w
    for m in router.modules():
        if isinstance(m, nn.Linear) and m.out_features == n_experts:
            return m.weight
    raise ActuatorError(f"router {type(router).__name__} has no [n_experts={n_experts}, d] weight")


def _own_loads(router: nn.Module, n_experts: int):
    """A cursor on a counting hook of the actuator's own (no probes handle given)."""
    own = HookLoads({0: (router, int(n_experts))})
    return own.load_cursor(0), own


class Actuator:
    """Base class: one actuator steers one layer's router."""

    name = "actuator"
    signal = "lens_scale"  # which decision field it consumes

    def __init__(self, layer: int):
        self.layer = int(layer)
        self.last_value = 0.0

    def act(self, decision: ControlDecision) -> None:
        raise NotImplementedError

    def on_step(self) -> None:
        """Per-training-step work (default: none)."""

    def remove(self) -> None:
        """Remove hooks; the model behaves as before the actuator existed."""


class LensActuator(Actuator):
    """The faithful ChronoLens (DESIGN §4): sets the lens scale to the policy's ``lens_scale``.

    Source: ChronoMoE's controller README (x' = x + s·(x@V)@U, random U, V ~ 1e-3).
    Reasoning: kept as the faithful baseline; with 1e-3 random directions the
    warp is ~s·1e-5 of x, which cannot move a top-k decision (measured in
    benchmarks/governance.py). ``hook=True`` installs the lens as a forward
    pre-hook on the router; pass ``hook=False`` when probes already applies it.
    """

    name = "lens"

    def __init__(self, router: nn.Module, layer: int, lens: nn.Module | None = None,
                 d_model: int | None = None, hook: bool = True, n_experts: int | None = None):
        super().__init__(layer)
        if lens is None:
            if d_model is None:
                n = n_experts if n_experts is not None else int(getattr(router, "n_experts"))
                d_model = router_weight(router, n).shape[1]
            lens = ChronoLens(d_model, layer_id=layer)
            p = next(router.parameters(), None)
            if p is not None:
                lens.to(p.device)
        self.lens = lens
        self.hooks = HookRegistry()
        if hook:
            self.hooks.pre(router, lens_pre_hook(lens))

    def act(self, decision: ControlDecision) -> None:
        self.last_value = decision.lens_scale
        self.lens.set_scale(decision.lens_scale)

    def remove(self) -> None:
        self.hooks.remove()


class InformedLensActuator(Actuator):
    """A lens whose direction comes from the router's own weight rows of under-used experts.

    Reasoning: logits are ``x @ W.T``; adding ``δ·u`` to the router input adds
    ``δ·(W u)`` to the logits, so the direction that raises the logits of
    starved experts relative to the rest is ``u ∝ Σ_e deficit_e·(W_e − mean(W))``
    where ``deficit_e = max(0, 1/n − share_e)`` over the last window. The shift
    is scaled by each token's norm (``x' = x + s·‖x‖·u``, s = the policy's lens
    scale × ``gain``), so it is scale-free. This is the ChronoLens form
    ``x + s·(x@V)@U`` with the random V, U replaced by informed directions
    (a rank-1, norm-gated version); it only touches the router input, never
    the experts' input. Source of the geometry: the router is a linear map, see
    e.g. Fedus et al. 2021 (Switch Transformer) §2.1.

    ``loads``: a ``LoadCursor`` over this router (the probes handle's counts under
    ``chrono.govern``); None: a counting hook of its own. The shares are those of
    the assignments since the previous ``act``.
    """

    name = "informed-lens"

    def __init__(self, router: nn.Module, layer: int, n_experts: int, gain: float = 1.0,
                 loads: LoadCursor | None = None):
        super().__init__(layer)
        self.router, self.n_experts, self.gain = router, int(n_experts), float(gain)
        w = router_weight(router, self.n_experts)
        self.direction = torch.zeros(w.shape[1], device=w.device, dtype=torch.float32)
        self.scale = 0.0
        self.hooks = HookRegistry()
        if loads is None:
            loads, own = _own_loads(router, n_experts)
            self.hooks.adopt(own)
        self.loads = loads
        self.hooks.pre(router, self._pre)

    def _pre(self, module, args):
        if self.scale == 0.0 or not args:
            return None
        x = args[0]
        u = self.direction.to(dtype=x.dtype, device=x.device)
        shifted = x + self.scale * x.norm(dim=-1, keepdim=True) * u
        return (shifted,) + tuple(args[1:])

    @torch.no_grad()
    def act(self, decision: ControlDecision) -> None:
        counts = self.loads.take()
        total = float(counts.sum())
        self.scale = 0.0 if decision.abstain else decision.lens_scale * self.gain
        self.last_value = self.scale
        if total <= 0 or self.scale == 0.0:
            return
        shares = counts / total
        deficit = (1.0 / self.n_experts - shares).clamp(min=0).to(self.direction.device)
        w = router_weight(self.router, self.n_experts).detach().float()
        u = (deficit[:, None] * (w - w.mean(0, keepdim=True))).sum(0)
        norm = float(u.norm())
        if norm == 0.0:
            self.scale = 0.0
            return
        self.direction.copy_(u / norm)

    def remove(self) -> None:
        self.hooks.remove()


def _native_bias(router: nn.Module):
    for attr in ("selection_bias", "e_score_correction_bias"):
        b = getattr(router, attr, None)
        if isinstance(b, torch.Tensor):
            return b
    return None


class RouterBiasActuator(Actuator):
    """Loss-free balancing: a per-expert bias added to the scores for top-k *selection* only.

    Source: Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
    Mixture-of-Experts" (arXiv:2408.15664), used in DeepSeek-V3 (arXiv:2412.19437,
    §2.1.2): after each step, ``b_i += u·sign(mean_load − load_i)``; the gate
    weights still come from the unbiased scores, so no gradient is distorted.

    Where the bias lives: the router's own tensor when it has one
    (``selection_bias``: this repo's native routers; ``e_score_correction_bias``:
    HF DeepSeek-V3, on its sigmoid scores), else a ``chrono.router_hooks.SelectionBias``
    hook in logit space (HF Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE). Any other router:
    ActuatorError. ``remove()`` restores an owned tensor to its value at install
    unless ``keep_bias=True`` (e.g. to save a DeepSeek-V3 checkpoint with the learnt
    bias); a hook bias disappears with its hook.

    ``pressure_scaled=False`` is the paper's constant-rate rule (a baseline);
    ``True`` makes the rate ``u·drive(decision)`` (faithful: clip(pressure /
    pressure_ref); setpoint: the PI effort), so balancing is spent only while
    and where the controller asks for it.

    ``loads``: a ``LoadCursor`` over this router (the probes handle's counts under
    ``chrono.govern``); None: a counting hook of its own, installed after the override
    so it sees the choice the bias made. The load of a step is that since the previous
    ``on_step``.
    """

    name = "bias"
    signal = "pressure"

    def __init__(self, router: nn.Module, layer: int, n_experts: int, rate: float = 1e-3,
                 pressure_scaled: bool = True, pressure_ref: float = 0.1, keep_bias: bool = False,
                 loads: LoadCursor | None = None):
        super().__init__(layer)
        self.n_experts = int(n_experts)
        bias = _native_bias(router)
        self._override = None
        if bias is None:
            try:
                self._override = SelectionBias(router, self.n_experts)
            except HookError as e:
                raise ActuatorError(f"bias: {e}; native routers need a selection_bias tensor") from None
            bias = self._override.bias
        self.bias = bias
        self._saved = None if (keep_bias or self._override is not None) else bias.detach().clone()
        self.rate, self.pressure_scaled, self.pressure_ref = float(rate), pressure_scaled, pressure_ref
        self._own = None
        if loads is None:
            loads, self._own = _own_loads(router, n_experts)
        self.loads = loads
        self.current_rate = 0.0 if pressure_scaled else self.rate

    @torch.no_grad()
    def set_bias(self, values) -> None:
        """Replace the selection bias [n_experts] (e.g. a learnt bias from a checkpoint)."""
        self.bias.copy_(torch.as_tensor(values, dtype=self.bias.dtype, device=self.bias.device))
        if self._override is not None:
            self._override.set_active(bool(torch.any(self.bias != 0)))

    def act(self, decision: ControlDecision) -> None:
        if self.pressure_scaled:
            self.current_rate = self.rate * drive(decision, self.pressure_ref)
        self.last_value = self.current_rate

    @torch.no_grad()
    def on_step(self) -> None:
        load = self.loads.take().to(self.bias.device)
        if self.current_rate == 0.0:
            return
        # no host sync: a step without traffic has load == mean == 0, so sign() adds nothing
        self.bias.add_(self.current_rate * torch.sign(load.mean() - load).to(self.bias.dtype))
        if self._override is not None:
            self._override.set_active(True)

    @torch.no_grad()
    def remove(self) -> None:
        if self._own is not None:
            self._own.remove()
        if self._override is not None:
            self._override.remove()
        elif self._saved is not None:
            self.bias.copy_(self._saved)


class TemperatureActuator(Actuator):
    """Router softmax temperature from ``heat``: T = 1 + (t_max − 1)·heat.

    Reasoning (ChronoMoE computes heat but feeds it with coefficient 0, DESIGN §4):
    a hotter softmax spreads gate probability, so the gradient reaches more
    experts' logits (the softmax normalisation couples them) and aux losses on
    probabilities see flatter P. It does not reorder a plain top-k by itself, so
    it is a slow actuator. Native routers: their float ``temperature`` attribute
    (logits / temperature), restored at ``remove()``; HF Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE, DeepSeek-V3: a pre-hook x -> x / T on the router input
    (``chrono.router_hooks.InputTemperature``). Any other router: ActuatorError.
    """

    name = "temperature"
    signal = "heat"

    def __init__(self, router: nn.Module, layer: int, t_max: float = 2.0):
        super().__init__(layer)
        self.router, self.t_max = router, float(t_max)
        self._hook = None
        self._saved = getattr(router, "temperature", None)
        if not isinstance(self._saved, (int, float)) or isinstance(self._saved, bool):
            self._saved = None
            try:
                self._hook = InputTemperature(router)
            except HookError as e:
                raise ActuatorError(f"temperature: {e}; native routers need a float 'temperature' "
                                    "attribute") from None

    def act(self, decision: ControlDecision) -> None:
        t = 1.0 + (self.t_max - 1.0) * decision.heat
        if self._hook is not None:
            self._hook.temperature = t
        else:
            self.router.temperature = t
        self.last_value = t

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        else:
            self.router.temperature = self._saved


class AuxLossActuator(Actuator):
    """A Switch load-balancing loss whose coefficient follows the controller.

    Source: Fedus et al. 2021 (Switch Transformer, arXiv:2101.03961) aux loss
    α·E·Σ f_i·P_i; DESIGN §6 measured α = 0.01 (good loss, Neff ~4.9/8) versus
    α = 0.1 (Neff ~7.5, worse loss). Reasoning: pay for the strong coefficient
    only while the layer needs it: α = α_min + (α_max − α_min)·drive(decision).
    The training loop reads ``alpha`` and adds ``alpha · aux_loss`` for the layer;
    given ``router`` and ``n_experts`` (and ``capture=True``) the actuator computes
    that term itself from the router's outputs (a forward hook keeps each grad-enabled
    forward's ``switch_aux_loss``, with its graph, until ``loss()`` or ``on_step()``):
    ``loss()`` returns α·mean(aux) for HF models that expose no aux term per layer.
    """

    name = "aux"
    signal = "pressure"

    def __init__(self, layer: int, alpha_min: float = 0.01, alpha_max: float = 0.1,
                 pressure_ref: float = 0.1, router: nn.Module | None = None,
                 n_experts: int | None = None, capture: bool = True):
        super().__init__(layer)
        self.alpha_min, self.alpha_max, self.pressure_ref = alpha_min, alpha_max, pressure_ref
        self.alpha = alpha_min
        self.n_experts = n_experts
        self._aux: list[torch.Tensor] = []
        self.hooks = HookRegistry()
        if capture and router is not None and n_experts is not None:
            self.hooks.forward(router, self._capture)

    def _capture(self, module, args, output):
        if torch.is_grad_enabled():
            self._aux.append(switch_aux_loss(output[0], routed_indices(output), self.n_experts))
        return None

    def act(self, decision: ControlDecision) -> None:
        self.alpha = self.alpha_min + (self.alpha_max - self.alpha_min) * drive(decision, self.pressure_ref)
        self.last_value = self.alpha

    def loss(self):
        """α times the mean aux loss of the forwards since the last call (0.0 if none); clears them."""
        if not self._aux:
            return 0.0
        aux, self._aux = torch.stack(self._aux).mean(), []
        return self.alpha * aux

    def on_step(self) -> None:
        self._aux = []   # a step whose loop never asked for loss() must not keep its graph alive

    def remove(self) -> None:
        self.hooks.remove()
        self._aux = []
