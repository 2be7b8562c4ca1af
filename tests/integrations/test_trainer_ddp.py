"""ChronoCallback in a real 2-rank DDP Trainer run (torchrun, gloo, CPU)."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import chrono

from .tiny import stored_counts

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_ddp_trainer_one_run_per_rank_counts_equal_truth(tmp_path):
    root, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    chrono.open_run(root, "ddp").close()   # the default id is taken: both ranks must agree on ddp-2
    worker = Path(__file__).with_name("ddp_worker.py")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", str(worker), str(root), str(out)],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["run_id"] for r in ranks] == ["ddp-2", "ddp-2"]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"   # the Trainer ran a wrapped model
    for r, data in enumerate(ranks):
        truth = Counter({tuple(c[:4]): c[4] for c in data["counts"]})
        stored = stored_counts(root, "ddp-2", rank=r)
        assert stored == truth
        assert sorted({s for s, m, *_ in stored if m == "TRAIN"}) == [1, 2, 3, 4]
        assert sorted({s for s, m, *_ in stored if m == "EVAL"}) == [2, 4]
    assert chrono.store.run_manifest(root, "ddp-2")["world_size"] == 2
