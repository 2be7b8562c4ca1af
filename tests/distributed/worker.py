"""One rank of the multi-rank telemetry test (started by ``torchrun --nproc_per_node 2``).

Trains a tiny MoE (native router protocol) for a few steps with probes and the
controller (lens actuator), and writes what this rank saw to
``OUT/rank<r>.json``: the per-(layer, expert) counts it routed, counted here
by a separate forward hook (independently of probes), the controller's
decisions and the lens scales.

``--ep``: expert-parallel layout: rank r's routers hold only experts
``[r * E/world, (r+1) * E/world)`` (local indices), declared with
``probes.distributed.Distributed(expert_slices=...)``.

``--metrics-port P``: every rank serves /metrics (``P + LOCAL_RANK``) and
scrapes its own endpoint once during training.

usage: worker.py ROOT RUN OUT STEPS FLUSH_EVERY [--ep] [--kill-rank R --kill-after S] [--metrics-port P]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout under test

import chrono  # noqa: E402
import probes  # noqa: E402
from probes.distributed import Distributed  # noqa: E402

D, E, K, LAYERS = 16, 8, 2, 2


class Router(nn.Module):
    """Native protocol router over ``n_experts`` experts; ``weight`` lets the lens actuator size its lens."""

    chrono_router = True

    def __init__(self, layer: int, n_experts: int, top_k: int):
        super().__init__()
        self.layer_id, self.n_experts, self.top_k = layer, n_experts, top_k
        self.weight = nn.Parameter(torch.randn(n_experts, D) * 0.5)

    def forward(self, x):
        logits = x @ self.weight.t()
        w, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        return logits, w, idx


class MoELayer(nn.Module):
    def __init__(self, layer: int, n_experts: int = E):
        super().__init__()
        self.router = Router(layer, n_experts, K)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(n_experts))

    def forward(self, x):
        _, w, idx = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = (idx == e)
            rows = sel.any(-1)
            if rows.any():
                out[rows] += (w * sel).sum(-1, keepdim=True)[rows] * expert(x[rows])
        return x + out


class TinyMoE(nn.Module):
    def __init__(self, n_experts: int = E):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.layers = nn.ModuleList(MoELayer(i, n_experts) for i in range(LAYERS))
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("flush_every", type=int)
    ap.add_argument("--ep", action="store_true")
    ap.add_argument("--rank1-extra-layer", action="store_true",
                    help="rank 1 builds one more MoE layer: attach must refuse on every rank")
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-after", type=int, default=-1)
    ap.add_argument("--metrics-port", type=int, default=None)
    ap.add_argument("--eval-only", action="store_true",
                    help="an evaluation script: STEPS no-grad forwards, no h.step(), then detach")
    ap.add_argument("--uneven", type=int, default=0,
                    help="rank 1 trains this many steps more than rank 0 (no gradient sync), each "
                         "ending with h.step(); rank 0 exits when done: rank 1's later collectives fail")
    a = ap.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                 # same weights on every rank
    n_local = E // world if a.ep else E
    offset = rank * n_local if a.ep else 0
    model = TinyMoE(n_local)
    if a.ep:   # expert weights differ per rank: do not average the expert/router grads
        torch.manual_seed(1 + rank)
        for layer in model.layers:
            layer.router.weight.data.normal_(0, 0.5)
    if a.rank1_extra_layer:
        if rank == 1:
            model.layers.append(MoELayer(LAYERS, n_local))
        try:
            probes.attach(model, run=a.run, root=a.root)
            msg = None
        except probes.ProbeError as e:
            msg = str(e)
        Path(a.out, f"rank{rank}.json").write_text(json.dumps({"error": msg}))
        dist.destroy_process_group()
        return
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1000 + rank)   # different data on every rank

    mine = torch.zeros(LAYERS, E, dtype=torch.int64)  # counted here, not by probes

    def count(layer):
        def hook(module, args, out):
            mine[layer, offset:offset + n_local] += torch.bincount(out[2].reshape(-1),
                                                                   minlength=n_local)
        return hook

    for i, layer in enumerate(model.layers):
        layer.router.register_forward_hook(count(i))

    dopt = Distributed(expert_slices=(offset, E)) if a.ep else None   # None: on by default
    if a.eval_only:
        with probes.attach(model, run=a.run, root=a.root, flush_every=a.flush_every,
                           distributed=dopt) as h, torch.no_grad():
            for step in range(a.steps):
                model(torch.randn(24 + 8 * rank, D, generator=gen))
        stats = h.stats()
        Path(a.out, f"rank{rank}.json").write_text(json.dumps(
            {"counts": mine.tolist(), "stats": stats["distributed"], "steps": stats["steps"]}))
        dist.barrier()
        dist.destroy_process_group()
        return
    if a.uneven:
        with probes.attach(model, run=a.run, root=a.root, flush_every=a.flush_every, distributed=dopt) as h:
            for step in range(a.steps + a.uneven * rank):
                x = torch.randn(24 + 8 * rank, D, generator=gen)
                loss = (model(x) - x.sum(-1)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                h.step()
        stats = h.stats()
        Path(a.out, f"rank{rank}.json").write_text(json.dumps(
            {"counts": mine.tolist(), "stats": stats["distributed"], "steps": stats["steps"],
             "faults": stats["faults"]}))
        dist.destroy_process_group()
        return
    scrape = None
    with probes.attach(model, run=a.run, root=a.root, flush_every=a.flush_every, distributed=dopt,
                       metrics_port=a.metrics_port) as h:
        assert h.stats()["distributed"]["world_size"] == world
        gov = chrono.govern(model, h, actuators=("lens",))
        for step in range(a.steps):
            x = torch.randn(24 + 8 * rank, D, generator=gen)   # ranks route different token counts
            loss = (model(x) - x.sum(-1)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            for name, p in model.named_parameters():   # data parallel: average shared grads
                if not (a.ep and ".layers." in f".{name}"):
                    if p.grad is None:   # an expert no token reached here: same collectives everywhere
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
            h.step()
            gov.step()
            if a.metrics_port is not None and step == a.flush_every:   # a window has closed
                import urllib.request
                with urllib.request.urlopen(h.metrics_server.url, timeout=10) as resp:
                    scrape = {"port": h.metrics_server.port, "body": resp.read().decode()}
            if rank == a.kill_rank and step + 1 == a.kill_after:
                h.flush()   # what this rank routed so far is on disk
                Path(a.out, f"rank{rank}.json").write_text(json.dumps({"counts": mine.tolist()}))
                os.kill(os.getpid(), signal.SIGKILL)
    # after detach: the last (partial) window was reduced and decided too
    decisions = [d.as_row() for d in gov.decisions]
    scales = {str(l): [float(a_.lens.scale) for a_ in acts] for l, acts in gov.actuators.items()}
    stats = h.stats()
    Path(a.out, f"rank{rank}.json").write_text(json.dumps({
        "counts": mine.tolist(), "decisions": decisions, "stats": stats["distributed"],
        "tokens_total": {str(k): v for k, v in stats["tokens_total"].items()},
        "scales": scales, "latest_snapshot": h.latest_snapshot(), "scrape": scrape,
        "metrics_server_closed": h.metrics_server is None or h.metrics_server._closed,
    }, default=float))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
