"""One rank of a 2-process DDP transformers.Trainer run with ChronoCallback (gloo, CPU).

usage: torchrun --nproc_per_node 2 ddp_worker.py STORE_ROOT OUT_DIR
Writes OUT_DIR/rank<r>.json: the run id the callback used and what this rank's routers chose.
"""
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from chrono.integrations.transformers import ChronoCallback  # noqa: E402
from tests.integrations.test_transformers_callback import StateSpy, _args, _trainer, _truth  # noqa: E402
from tests.integrations.tiny import qwen3_moe  # noqa: E402

root, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model, spy = qwen3_moe(), StateSpy()
truth = _truth(model, spy)
cb = ChronoCallback(root=root)
args = _args(os.path.join(out, "ddp"), max_steps=4, gradient_accumulation_steps=2, eval_steps=2,
             logging_steps=2, ddp_backend="gloo")
trainer = _trainer(model, args, spy, cb)
trainer.train()
rank = torch.distributed.get_rank()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"run_id": cb.run_id, "wrapped": type(trainer.model_wrapped).__name__,
               "counts": [list(k) + [v] for k, v in truth.counts.items()]}, f)
