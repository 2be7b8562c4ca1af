"""A real training loop with probes attached, run until it is SIGKILLed (see harness.py).

stdout protocol (unbuffered): ``ready``; ``step S`` before training step S;
``durable R`` whenever the run's writer reports R routing rows on disk (its
counter moves only after a part file was renamed into place).

usage: python train_child.py ROOT RUN FLUSH_EVERY
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch

import probes

_spec = importlib.util.spec_from_file_location("moe_tiny", Path(__file__).with_name("moe_tiny.py"))
moe_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(moe_tiny)


def main() -> None:
    root, run, every = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = moe_tiny.TinyMoE()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    durable = -1
    with probes.attach(model, run=run, root=root, flush_every=every) as h:
        os.write(1, b"ready\n")
        for step in range(10**7):
            os.write(1, f"step {step}\n".encode())
            x = torch.randn(moe_tiny.D * 2, moe_tiny.D)
            loss = ((model(x) - x.sum(-1)) ** 2).mean()  # one forward = one probes step
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows = h.writer.stats.rows_written["routing"]
            if rows != durable:
                durable = rows
                os.write(1, f"durable {rows}\n".encode())


if __name__ == "__main__":
    main()
