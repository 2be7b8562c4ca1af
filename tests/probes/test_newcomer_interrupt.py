"""Ctrl-C while leaving ``with probes.attach(...)``: no data lost, the run not left locked."""
from __future__ import annotations

import torch

import chrono
import probes
from probes import flusher


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                            num_experts_per_tok=2))


def test_ctrl_c_while_detach_waits_for_the_writer_keeps_data_and_frees_the_run(tmp_path, monkeypatch):
    # A KeyboardInterrupt while detach() joined the background writer (the last window being
    # written) skipped the rest of detach: writer.close() never ran, so the run's writer lock
    # stayed held and attaching to the run again in the same process (a notebook) was refused
    # ("already being written by another writer") until the process ended. The interrupt is
    # simulated where a real Ctrl-C lands: after the stop sentinel is queued, in the join.
    model = _mixtral()
    seen = []
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):
            mod.register_forward_hook(lambda m, a, out: seen.append(out[2].numel()))
    real_close = flusher.BackgroundWriter.close

    def close_interrupted_in_join(self):
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        raise KeyboardInterrupt   # Ctrl-C in self._thread.join()

    monkeypatch.setattr(flusher.BackgroundWriter, "close", close_interrupted_in_join)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randint(0, 64, (2, 8))
    try:
        with probes.attach(model, run="r", root=tmp_path, flush_every=5) as first:   # kept, as in a notebook
            for _ in range(8):
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad()
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the Ctrl-C was swallowed")
    monkeypatch.setattr(flusher.BackgroundWriter, "close", real_close)
    con = chrono.connect(tmp_path)
    assert con.execute("SELECT sum(tokens) FROM routing").fetchall() == [(sum(seen),)]
    assert con.execute("SELECT count(DISTINCT step) FROM routing").fetchall() == [(8,)]
    with probes.attach(model, run="r", root=tmp_path) as h:   # the run is free again
        model(input_ids=x)
    assert h.current_step >= 8
    assert first.stats()["steps"] == 8
