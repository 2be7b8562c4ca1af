"""Workload tests train tiny models: one intra-op thread is fastest for them, and on a loaded
2-core machine torch's default of one thread per core makes each step seconds slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
