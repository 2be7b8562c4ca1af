"""``distributed=`` argument handling and the reduce layout, in one process (world size 1).

The multi-process behaviour is in ``test_multirank.py``; these check the
argument rules and the expert-slice placement without launching anything.
"""
from __future__ import annotations

import datetime
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import chrono
import probes
from probes.distributed import Distributed, DistributedSync, payload_bytes, resolve

pytestmark = pytest.mark.distributed


class Router(nn.Module):
    chrono_router = True

    def __init__(self, n_experts=4, layer_id=0):
        super().__init__()
        self.n_experts, self.top_k, self.layer_id = n_experts, 1, layer_id
        self.weight = nn.Parameter(torch.randn(n_experts, 8))

    def forward(self, x):
        logits = x @ self.weight.t()
        w, idx = logits.softmax(-1).topk(1, dim=-1)
        return logits, w, idx


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = Router()

    def forward(self, x):
        return self.router(x)


@pytest.fixture
def world_of_one(tmp_path):
    store = dist.FileStore(str(tmp_path / "pg"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def sites(*n_experts):
    return [SimpleNamespace(layer=i, n_experts=n, module=object()) for i, n in enumerate(n_experts)]


def test_off_without_process_group_and_true_is_a_clear_error(tmp_path):
    assert not dist.is_initialized()
    assert resolve(None, sites(4)) is None
    assert resolve(False, sites(4)) is None
    with pytest.raises(probes.ProbeError, match="init_process_group"):
        probes.attach(Model(), run="x", root=tmp_path, distributed=True)
    with pytest.raises(probes.ProbeError, match="distributed must be"):
        resolve("yes", sites(4))


def test_on_by_default_when_initialised(world_of_one, tmp_path):
    m = Model()
    torch.manual_seed(0)
    with probes.attach(m, run="one", root=tmp_path, flush_every=2) as h:
        assert h.stats()["distributed"]["world_size"] == 1
        for _ in range(4):
            m(torch.randn(5, 8))
            h.step()
        assert h.stats()["distributed"]["reduces"] == 2
    con = chrono.connect(tmp_path)
    n = con.sql("SELECT sum(tokens)::BIGINT FROM routing").to_arrow_table().column(0).to_pylist()[0]
    assert n == 20
    snaps = con.sql("SELECT token_count FROM snapshots WHERE layer = 0").to_arrow_table().column(0)
    assert snaps.to_pylist() == [10, 10]


def test_forwards_never_end_steps_in_distributed_mode(world_of_one, tmp_path):
    m = Model()
    with probes.attach(m, run="nostep", root=tmp_path, flush_every=1) as h:
        m(torch.randn(3, 8))
        m(torch.randn(3, 8))
        assert h.current_step == 0 and h.stats()["distributed"]["reduces"] == 0
        h.step()
        assert h.stats()["distributed"]["reduces"] == 1


def test_expert_slices_place_local_counts_in_the_global_space(world_of_one):
    sync = DistributedSync(sites(2, 3), Distributed(expert_slices={0: (2, 4), 1: (0, 5)}))
    win = np.array([[5, 7, 0, 9], [1, 2, 3, 9]])      # [slot, cap + 1], last column = invalid ids
    drop = np.array([[1, 0, 0, 0], [0, 0, 1, 0]])
    counts, dropped, n = sync.reduce_window(win, drop, [2, 3], n_steps=1, last_step=0)
    assert n == [4, 5]
    np.testing.assert_array_equal(counts, [[0, 0, 5, 7, 0], [1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(dropped, [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0]])
    assert sync.bytes_reduced == payload_bytes(1, 9)   # header + counts + drops of 9 global experts
    assert sync.expert_offsets([0, 1]).tolist() == [2, 0]


def test_bad_expert_slices_are_user_errors(world_of_one):
    with pytest.raises(probes.ProbeError, match="do not fit"):
        DistributedSync(sites(4), Distributed(expert_slices=(2, 4)))
    with pytest.raises(probes.ProbeError, match="layer"):
        DistributedSync(sites(4), Distributed(expert_slices={7: (0, 8)}))
    with pytest.raises(probes.ProbeError, match="offset, n_global"):
        DistributedSync(sites(4), Distributed(expert_slices="half"))


def test_stopped_sync_does_not_communicate(world_of_one):
    sync = DistributedSync(sites(2), Distributed())
    sync.stop("test")
    counts, _, _ = sync.reduce_window(np.array([[3, 4, 0]]), np.zeros((1, 3), int), [2], 1, 0)
    assert counts.sum() == 0 and sync.reduces == 0


def test_log_routing_expert_offset_broadcasts_like_layer(tmp_path):
    """An expert-parallel rank logs global expert ids: offset per layer, broadcast over steps."""
    with chrono.open_run(tmp_path, "ep", rank=0, world_size=2) as w:   # rank 0 writes the manifest
        w.log_routing(np.array([[3], [4]]), np.array([[0, 1]]), np.ones((2, 2, 2), dtype=np.int64),
                      expert_offset=np.array([[2, 4]]))
    rows = chrono.connect(tmp_path).sql("SELECT DISTINCT layer, expert, rank FROM routing ORDER BY ALL"
                                        ).to_arrow_table().to_pylist()
    assert [(r["layer"], r["expert"], r["rank"]) for r in rows] == [(0, 2, 0), (0, 3, 0), (1, 4, 0), (1, 5, 0)]



# ------------------------------------------------- NCCL device choice (no GPU needed)
@pytest.mark.parametrize("backend, bound, current, local_rank, n_gpus, expected", [
    ("gloo", None, 0, "1", 2, "cpu"),                       # gloo: always the CPU
    ("cpu:gloo,cuda:nccl", None, 0, "1", 2, "cpu"),         # mixed: gloo takes CPU tensors
    ("nccl", None, 3, "3", 4, "cuda:3"),                    # set_device(LOCAL_RANK) was called
    ("nccl", None, 0, "2", 4, "cuda:2"),                    # it was not: LOCAL_RANK picks the GPU
    ("nccl", None, 0, "1", 1, "cuda:0"),                    # one visible GPU per process (CUDA_VISIBLE_DEVICES)
    ("nccl", None, 0, "", 4, "cuda:0"),                     # no launcher env: the current device
    ("nccl", "cuda:5", 0, "2", 8, "cuda:5"),                # init_process_group(device_id=...) wins
])
def test_collective_device_for_nccl_and_gloo(monkeypatch, backend, bound, current, local_rank, n_gpus,
                                             expected):
    """The NCCL path cannot run here (no GPU); its device choice is checked with the backend and
    the CUDA queries faked, so a wrong choice (every rank on cuda:0) fails on CPU."""
    import probes.distributed as D

    world = SimpleNamespace(bound_device_id=None if bound is None else torch.device(bound))
    fake = SimpleNamespace(get_backend=lambda group: backend, group=SimpleNamespace(WORLD=world))
    monkeypatch.setattr(D, "_dist", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert D._collective_device(None) == torch.device(expected)


def test_collective_device_is_cpu_without_cuda(monkeypatch):
    import probes.distributed as D

    monkeypatch.setattr(D, "_dist", lambda: SimpleNamespace(get_backend=lambda group: "nccl"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D._collective_device(None) == torch.device("cpu")
