"""Multi-rank telemetry: one all-reduce of the window's counts per flush (DESIGN §8).

Why one collective per flush and nothing else: every rank must build the same
snapshot rows so that the controller (a pure function of those rows) takes the
same decisions everywhere, and lens scales stay in sync with no extra
communication. Per-step or per-hook communication would stall training, so the
reduce runs only where the window closes (``h.step()``, ``h.flush()``,
detach), in the training thread, never inside a forward hook.

What is reduced: per router slot, the window's dispatched counts and dropped
assignments (summed over steps and modes), laid out in the *global* expert
space, concatenated into one int64 vector with a two-number header (window
length and last step, used to detect ranks that disagree on the window).

Expert parallelism: when a rank's router only sees a slice of the experts
(local indices ``0..n_local``), give ``expert_slices={layer: (offset,
n_global)}`` (or ``(offset, n_global)`` for every layer), or set the router
attributes ``expert_offset`` and ``n_experts_global``. Local counts are placed
at ``[offset, offset + n_local)`` before the sum, so each assignment is counted
once, by the rank that holds its expert; the rank's ``routing`` rows carry
global expert ids. A replicated router (each rank routes its own tokens over
all experts, the usual data/expert-parallel gate) needs nothing: the sum over
ranks is the global count.

Store: each rank writes its own parts (``part-<rank>-<seq>``, ``rank``
column) with its *local* routing, so the sum over ranks is the global count;
snapshots, alerts and decisions are written by rank 0 only.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .routing import ProbeError

log = logging.getLogger("probes")

HEADER = 2  # [window length in steps, last step of the window]


@dataclass
class Distributed:
    """Options for ``probes.attach(..., distributed=Distributed(...))``.

    ``group``: the process group to reduce over (default: the world). It must
    hold every rank whose tokens go through these routers; its rank 0 writes
    the snapshots, alerts and decisions.
    ``expert_slices``: ``{layer: (offset, n_global)}`` or one ``(offset,
    n_global)`` for every layer, for routers that only see this rank's experts.
    """

    group: object = None
    expert_slices: object = None


def _dist():
    import torch.distributed as dist
    return dist


def is_initialized() -> bool:
    try:
        dist = _dist()
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def resolve(distributed, routers) -> "DistributedSync | None":
    """``attach``'s ``distributed=`` argument -> a ``DistributedSync`` or None (single process).

    None (default): on when ``torch.distributed`` is initialised. True: on, and
    an error if it is not. False: off (each rank then needs its own run id).
    """
    if distributed is None:
        return DistributedSync(routers, Distributed()) if is_initialized() else None
    if distributed is False:
        return None
    opts = distributed if isinstance(distributed, Distributed) else Distributed()
    if distributed is not True and not isinstance(distributed, Distributed):
        raise ProbeError("distributed must be None, True, False or probes.distributed.Distributed(...), "
                         f"got {distributed!r}")
    if not is_initialized():
        raise ProbeError("distributed=True needs torch.distributed to be initialised first "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    return DistributedSync(routers, opts)


def _collective_device(group) -> torch.device:
    """Where the flush buffer lives for the all-reduce: CPU for gloo (and mixed
    ``cpu:gloo,cuda:nccl``), this rank's GPU for NCCL.

    This rank's GPU: the device the process group was bound to
    (``init_process_group(device_id=...)``), else the current CUDA device. A
    script that never called ``torch.cuda.set_device`` has current device 0 on
    every rank, and NCCL refuses (or hangs on) two ranks of one node on one
    GPU; then ``LOCAL_RANK`` (set by torchrun) picks the GPU, as it would with
    ``set_device(LOCAL_RANK)``.
    """
    backend = str(_dist().get_backend(group)).lower()
    if "gloo" in backend or "cpu" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    if "nccl" not in backend:
        return torch.device("cpu")
    pg = group if group is not None else _dist().group.WORLD
    bound = getattr(pg, "bound_device_id", None)
    if bound is not None:
        return torch.device(bound)
    current = torch.cuda.current_device()
    local = os.environ.get("LOCAL_RANK", "")
    if current == 0 and local.isdigit() and 0 < int(local) < torch.cuda.device_count():
        return torch.device("cuda", int(local))
    return torch.device("cuda", current)


class DistributedSync:
    """Rank identity, expert layout and the one all-reduce per flush window."""

    def __init__(self, routers, opts: Distributed):
        dist = _dist()
        self.group = opts.group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.global_rank = dist.get_rank()
        self.device = _collective_device(self.group)
        self.reduces = 0
        self.bytes_reduced = 0
        self.seconds = 0.0
        self.mismatches = 0
        self.failures = 0   # all-reduces that raised (then stopped)
        self.stopped: str | None = None
        self._routers = routers
        self.offsets = np.zeros(len(routers), dtype=np.int64)
        self._global = [None] * len(routers)   # fixed n_global per slot, None = same as local
        slices = opts.expert_slices
        for i, site in enumerate(routers):
            sl = None
            if isinstance(slices, dict):
                sl = slices.get(site.layer)
            elif slices is not None:
                sl = slices
            if sl is None and hasattr(site.module, "expert_offset") \
                    and hasattr(site.module, "n_experts_global"):
                sl = (site.module.expert_offset, site.module.n_experts_global)
            if sl is not None:
                try:
                    off, total = (int(v) for v in sl)
                except (TypeError, ValueError):
                    raise ProbeError(f"expert slice for layer {site.layer} must be (offset, n_global), "
                                     f"got {sl!r}") from None
                if off < 0 or off + site.n_experts > total:
                    raise ProbeError(f"layer {site.layer}: experts [{off}, {off + site.n_experts}) of this "
                                     f"rank do not fit in n_global={total}")
                self.offsets[i], self._global[i] = off, total
        if isinstance(slices, dict):
            unknown = set(slices) - {s.layer for s in routers}
            if unknown:
                raise ProbeError(f"expert_slices for layer(s) {sorted(unknown)} but routers are on "
                                 f"layers {sorted(s.layer for s in routers)}")
        self.expert_parallel = any(g is not None for g in self._global)
        self._check_same_layout()

    def _check_same_layout(self) -> None:
        """One collective at attach: every rank must reduce the same layers x experts layout.

        Ranks with different routers (pipeline stages, a rank that found other
        routers) would otherwise pair flush buffers of different sizes: gloo
        aborts the process, NCCL can hang. Max of (v, -v) gives max and min in one call.
        """
        layers = [int(s.layer) for s in self._routers]
        n = self.global_experts([s.n_experts for s in self._routers])
        sig = np.array([len(layers), sum(n), sum((i + 1) * (l + 7) * (e + 3) for i, (l, e)
                                                 in enumerate(zip(layers, n)))], dtype=np.int64)
        t = torch.from_numpy(np.concatenate([sig, -sig])).to(self.device)
        _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=self.group)
        both = t.cpu().numpy()
        hi, lo = both[:3], -both[3:]
        if (hi != lo).any():
            raise ProbeError(
                f"ranks found different routers (this rank {self.rank}: {len(layers)} router layers "
                f"{layers}, {sum(n)} experts in all; over the group: {int(lo[0])}-{int(hi[0])} layers, "
                f"{int(lo[1])}-{int(hi[1])} experts). Multi-rank probes need the same routers on every "
                "rank of the group; pipeline-parallel stages holding different layers are not "
                "supported yet")

    @property
    def is_writer_of_globals(self) -> bool:
        """Snapshots, alerts and decisions are written by rank 0 only."""
        return self.rank == 0

    def writer_kwargs(self) -> dict:
        # part files are named by the GLOBAL rank, so names never collide across groups
        return {"rank": self.global_rank, "world_size": _dist().get_world_size()}

    def global_experts(self, local: list[int]) -> list[int]:
        return [n if g is None else g for n, g in zip(local, self._global)]

    def expert_offsets(self, slots) -> np.ndarray:
        return self.offsets[np.asarray(slots, dtype=np.int64)]

    def model_desc(self, desc: dict) -> dict:
        """The manifest's model description with global expert counts (expert parallelism)."""
        if not self.expert_parallel:
            return desc
        n = self.global_experts([s.n_experts for s in self._routers])
        out = dict(desc)
        out["experts_per_layer"] = {str(s.layer): g for s, g in zip(self._routers, n)}
        return out

    def reduce_window(self, win_counts: np.ndarray, win_drop: np.ndarray, local_experts: list[int],
                      n_steps: int, last_step: int):
        """Sum this window's ``[slot, cap+1]`` counts and drops over ranks in ONE all-reduce.

        Returns ``(counts [slot, G], dropped [slot, G], n_global per slot)`` in the
        global expert space, identical on every rank. After ``stop()`` it returns
        zeros without communicating (no snapshot for that window; the rank's own
        routing rows are still written). A collective that raises (another rank left, a
        timeout: ranks that ended different numbers of steps) stops this handle's reducing:
        that window's routing rows are written as this rank's rows all the same.
        """
        g_n = self.global_experts(local_experts)
        if self.stopped is not None:
            width = max(g_n, default=0)
            return (np.zeros((len(g_n), width), np.int64), np.zeros((len(g_n), width), np.int64), g_n)
        sizes = np.asarray(g_n, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else np.zeros(0, np.int64)
        total = int(sizes.sum())
        buf = np.zeros(HEADER + 2 * total, dtype=np.int64)
        buf[0], buf[1] = n_steps, last_step
        body_c, body_d = buf[HEADER:HEADER + total], buf[HEADER + total:]
        for i, n in enumerate(local_experts):
            a = starts[i] + self.offsets[i]
            body_c[a:a + n] = win_counts[i, :n]
            body_d[a:a + n] = win_drop[i, :n]
        t0 = time.perf_counter()
        try:
            t = torch.from_numpy(buf).to(self.device)
            _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=self.group)
            out = t.cpu().numpy() if t.device.type != "cpu" else t.numpy()
        except Exception as e:   # a peer gone or timed out (uneven steps): keep the rank's rows
            self.failures += 1
            self.stop(f"the window's all-reduce failed: {type(e).__name__}: {e}")
            return self.reduce_window(win_counts, win_drop, local_experts, n_steps, last_step)
        self.seconds += time.perf_counter() - t0
        self.reduces += 1
        self.bytes_reduced += buf.nbytes
        if out[0] != n_steps * self.world_size or out[1] != last_step * self.world_size:
            self.mismatches += 1
            log.error("probes: ranks disagree on the flush window (this rank: %d steps ending at step "
                      "%d; sums over %d ranks: %d, %d). Call h.step() the same number of times on "
                      "every rank.", n_steps, last_step, self.world_size, int(out[0]), int(out[1]))
        width = int(sizes.max()) if len(sizes) else 0
        counts = np.zeros((len(sizes), width), dtype=np.int64)
        dropped = np.zeros((len(sizes), width), dtype=np.int64)
        for i, n in enumerate(g_n):
            counts[i, :n] = out[HEADER + starts[i]:HEADER + starts[i] + n]
            dropped[i, :n] = out[HEADER + total + starts[i]:HEADER + total + starts[i] + n]
        return counts, dropped, g_n

    def on_exit(self, handle, failed: bool) -> None:
        """Leaving ``with probes.attach(...)``: an exception means other ranks may be inside
        their own collectives (DDP), so ours must not start."""
        if failed:
            self.stop("left the with block by an exception")
        elif handle.stats()["steps"] == 0 and handle.stats()["hook_calls"]:
            log.warning("probes: multi-rank mode ends steps only at h.step(); without it each rank's "
                        "routing is written as that rank's rows, with no global snapshot (call "
                        "h.step() once per step on every rank for reduced counts and alerts)")

    def stop(self, why: str) -> None:
        """No more collectives from this handle (a rank leaving early must not pair its
        all-reduce with another rank's unrelated collective)."""
        if self.stopped is None:
            self.stopped = why
            log.warning("probes: rank %d stops reducing counts (%s); its last window gets no "
                        "snapshot", self.rank, why)

    def globalize_tokens(self, tok):
        """Sampled token rows (``ints[:, 1]`` layer, ``ints[:, 6]`` expert) to global expert ids."""
        if tok is None or not self.expert_parallel:
            return tok
        ints, weights = tok
        ints = ints.copy()
        layer_off = {s.layer: int(o) for s, o in zip(self._routers, self.offsets)}
        for layer, off in layer_off.items():
            if off:
                sel = ints[:, 1] == layer
                ints[sel, 6] += off
        return ints, weights

    def metrics_port(self, port: int) -> int:
        """``metrics_port`` for this process: several ranks on one node must not share a port.

        ``port + LOCAL_RANK`` (torchrun sets it; without it, ``port + rank``), so a node
        with 8 ranks serves ``port .. port+7``. ``0`` (any free port) stays 0.
        """
        if int(port) == 0:
            return 0
        local = os.environ.get("LOCAL_RANK")
        offset = int(local) if local is not None and local.isdigit() else self.global_rank
        return int(port) + offset

    def stats(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "reduces": self.reduces,
                "bytes_reduced": self.bytes_reduced, "reduce_seconds": self.seconds,
                "window_mismatches": self.mismatches, "reduce_failures": self.failures}


def payload_bytes(layers: int, experts: int) -> int:
    """Bytes of one flush all-reduce: int64 header + counts + drops for every layer."""
    return 8 * (HEADER + 2 * layers * experts)
