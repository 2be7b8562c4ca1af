"""The semantic MoE's router (ASTRA-X design): MeaningSpace encoder, FAISS k-means teacher,
distilled linear student, hybrid with a load penalty. See ``model.py`` for the whole model.

Follows chrono's native router protocol: ``chrono_router = True``, ``n_experts``, ``top_k``,
``layer_id``; ``forward(x [T, d]) -> (scores [T, E], weights [T, k], indices [T, k])``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import SemanticMoEConfig


# ---------------------------------------------------------------- clustering (FAISS)
def spherical_kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20,
                     init: np.ndarray | None = None) -> np.ndarray:
    """FAISS spherical k-means, single-threaded so the result depends only on (x, k, seed)
    (and ``init``: warm-start centroids, used by periodic re-clustering)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed), spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=100000)
        km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, np.float32))
        c = np.array(km.centroids, dtype=np.float32)
    finally:
        faiss.omp_set_num_threads(threads)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-8)


def match_centroids(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Reorder ``new`` so row i is the new centroid closest to old row i (Hungarian on cosine)."""
    from scipy.optimize import linear_sum_assignment

    if not np.any(old):
        return new
    rows, cols = linear_sum_assignment(-(old @ new.T))
    out = np.empty_like(new)
    out[rows] = new[cols]
    return out


# ---------------------------------------------------------------- router
class RouterTrace(NamedTuple):
    """One router forward's internals, appended to the ``trace`` list a caller passes down
    (distillation and evaluation read them; nothing is kept on the module)."""
    layer: int
    teacher: torch.Tensor    # [T, E] teacher logits (-distance² / tau)
    student: torch.Tensor    # [T, E] student logits, with graph to the student's weights
    idx: torch.Tensor        # [T, k] experts chosen


class MeaningSpace(nn.Module):
    """x [T, d_model] -> unit semantic vectors z [T, d_meaning] (frozen projection)."""

    def __init__(self, d_model: int, d_meaning: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d_model, max(d_model, d_meaning), generator=g))
        self.register_buffer("proj", q[:, :d_meaning].contiguous())

    def forward(self, x):
        return F.normalize(x.detach() @ self.proj, dim=-1)


class SemanticRouter(nn.Module):
    chrono_router = True

    def __init__(self, cfg: SemanticMoEConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.n_experts = cfg.n_experts
        self.top_k = 1 if cfg.faithful else cfg.top_k
        dm = cfg.d_model if cfg.faithful else cfg.d_meaning  # seed: semantic vector = hidden state
        self.meaning = None if cfg.faithful else MeaningSpace(cfg.d_model, cfg.d_meaning, cfg.seed + 101 * layer_id)
        self.student = nn.Linear(cfg.d_model, cfg.n_experts)
        self.register_buffer("centroids", torch.zeros(cfg.n_experts, dm))
        self.register_buffer("load_ema", torch.full((cfg.n_experts,), 1.0 / cfg.n_experts))
        self.register_buffer("window_counts", torch.zeros(cfg.n_experts, dtype=torch.long))
        self.alpha = 0.0           # weight of the student in the hybrid, set by the schedule
        self.teacher_ready = False
        self.recluster_iters = 5   # warm-started re-fits move centroids gently
        self._reservoir: list[np.ndarray] = []
        self._reservoir_rows = 0

    def semantic(self, x):
        return x.detach() if self.meaning is None else self.meaning(x)

    def teacher_logits(self, z):
        # -||z - c||^2 / tau : nearest centroid has the largest score
        return -torch.cdist(z, self.centroids).pow(2) / self.cfg.teacher_tau

    def forward(self, x, trace: list | None = None):
        """x [T, d_model] -> (scores [T, E], weights [T, k], indices [T, k]); appends a
        ``RouterTrace`` to ``trace`` when given."""
        z = self.semantic(x)                                   # [T, dm]
        t_logits = self.teacher_logits(z)                      # [T, E]
        s_logits = self.student(x.detach())                    # [T, E]
        # the student learns only from the teacher (distillation), not from the LM loss
        p = (1 - self.alpha) * F.softmax(t_logits, -1) + self.alpha * F.softmax(s_logits.detach(), -1)
        over = F.relu(self.load_ema * self.n_experts - 1.0)    # [E] overload above fair share
        scores = torch.log(p + 1e-9) - self.cfg.load_penalty * over
        top_w, idx = torch.topk(scores, self.top_k, dim=-1)    # [T, k]
        if self.cfg.faithful:
            weights = torch.ones_like(top_w)                    # seed: output not weighted
        else:
            weights = torch.gather(p, -1, idx)
            weights = weights / weights.sum(-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(idx.reshape(-1), minlength=self.n_experts)[: self.n_experts]
                self.window_counts += counts
                share = counts.float() / max(1, idx.numel())
                m = self.cfg.load_momentum
                self.load_ema.mul_(m).add_((1 - m) * share)
                self._remember(z)
        if trace is not None:
            trace.append(RouterTrace(self.layer_id, t_logits, s_logits, idx))
        return scores, weights, idx

    # ---- reservoir + clustering
    def _remember(self, z, per_step: int = 256):
        zz = z.detach()
        if zz.shape[0] > per_step:
            sel = torch.randperm(zz.shape[0], generator=torch.Generator().manual_seed(
                self._reservoir_rows))[:per_step]
            zz = zz[sel.to(zz.device)]
        self._reservoir.append(zz.float().cpu().numpy())
        self._reservoir_rows += zz.shape[0]
        while self._reservoir_rows - self._reservoir[0].shape[0] >= self.cfg.reservoir:
            self._reservoir_rows -= self._reservoir.pop(0).shape[0]

    def reservoir(self) -> np.ndarray:
        if not self._reservoir:
            return np.zeros((0, self.centroids.shape[1]), np.float32)
        return np.concatenate(self._reservoir)[-self.cfg.reservoir:]

    def fit_teacher(self, seed: int) -> float:
        """(Re)fit the teacher's centroids on the reservoir; returns mean cosine shift."""
        x = self.reservoir()
        if x.shape[0] < self.n_experts:
            raise ValueError(f"need at least {self.n_experts} meaning vectors, have {x.shape[0]}")
        old = self.centroids.to("cpu", copy=True).numpy()
        warm = old if self.teacher_ready and np.any(old) else None
        new = match_centroids(old, spherical_kmeans(x, self.n_experts, seed, niter=self.recluster_iters
                                                    if warm is not None else 20, init=warm))
        shift = float(1 - np.mean(np.sum(old * new, 1))) if np.any(old) else 1.0
        self.centroids.copy_(torch.from_numpy(new))
        self.teacher_ready = True
        return shift

    def save_centroids(self, path) -> None:
        np.savez(path, centroids=self.centroids.cpu().numpy(), layer=self.layer_id)

    def load_centroids(self, path) -> None:
        c = np.load(path)["centroids"]
        if c.shape != tuple(self.centroids.shape):
            raise ValueError(f"centroids {c.shape} do not fit this router {tuple(self.centroids.shape)}")
        self.centroids.copy_(torch.from_numpy(c))
        self.teacher_ready = True

    # ---- expert-set surgery (rows of student / centroids / loads)
    def _resize(self, keep: list[int], extra_centroids: list[torch.Tensor], extra_student: list[tuple]):
        dev = self.centroids.device
        cents = [self.centroids[i] for i in keep] + [c.to(dev) for c in extra_centroids]
        w = self.student.weight.data
        b = self.student.bias.data
        rows = [(w[i], b[i]) for i in keep] + list(extra_student)
        n = len(cents)
        self.centroids = torch.stack(cents)
        lin = nn.utils.skip_init(nn.Linear, w.shape[1], n, device=dev, dtype=w.dtype)  # no RNG draw
        lin.weight.data.copy_(torch.stack([r[0] for r in rows]))
        lin.bias.data.copy_(torch.stack([r[1] for r in rows]))
        self.student = lin
        loads = [self.load_ema[i] for i in keep] + [torch.tensor(1.0 / n, device=dev)] * len(extra_centroids)
        self.load_ema = torch.stack(loads).float()
        self.window_counts = torch.zeros(n, dtype=torch.long, device=dev)
        self.n_experts = n
        self.top_k = min(self.top_k, n)
