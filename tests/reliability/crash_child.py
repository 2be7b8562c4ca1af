"""A telemetry writer that runs until it is SIGKILLed (driven by harness.py).

Protocol on stdout (unbuffered ``os.write``, one line each):
``ready`` once the run is open; ``logged S`` just before step S is handed to
the writer; ``flushed N`` after ``flush()`` returned, i.e. every step < N is on
disk. A step is ``layers x experts`` routing rows plus one ``loss`` signal.

usage: python crash_child.py ROOT RUN FIRST_STEP FLUSH_EVERY LAYERS EXPERTS [MAX_STEPS]
"""
import os
import sys

import numpy as np

import chrono


def main() -> None:
    root, run = sys.argv[1], sys.argv[2]
    first, every, layers, experts = (int(a) for a in sys.argv[3:7])
    max_steps = int(sys.argv[7]) if len(sys.argv) > 7 else 1_000_000
    rng = np.random.default_rng(first)
    layer_ids = np.arange(layers)
    with chrono.open_run(root, run, model={"layers": list(range(layers))}) as w:
        os.write(1, b"ready\n")
        for step in range(first, first + max_steps):
            counts = rng.integers(0, 100, size=(layers, experts))
            os.write(1, f"logged {step}\n".encode())
            w.log_routing(step, layer_ids, counts)
            w.log_signal(step, "loss", float(counts.mean()))
            if (step - first + 1) % every == 0:
                w.flush()
                os.write(1, f"flushed {step + 1}\n".encode())
    os.write(1, b"done\n")


if __name__ == "__main__":
    main()
