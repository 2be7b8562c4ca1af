"""Governance benchmark: which balancing reaches healthy routing at the lowest validation loss?

Two workloads (``governance_workloads.py``): ``byte-moe``, a byte-level MoE LM built to
collapse, and ``qwen3-moe``, a tiny HF Qwen3-MoE with its stock router, both trained on
``pydoc_data.topics`` for 600 steps (full size) with a Trainer-free loop.

Arms, all declared before any result was seen:

  none            no balancing
  aux<a>          Switch aux loss, alpha in {0.003, 0.01, 0.03, 0.1, 0.3} (Fedus et al. 2021)
  bias<u>         loss-free bias balancing, constant rate u in {0.005, 0.02, 0.08} logit units
                  per step (Wang et al. 2024 / DeepSeek-V3)
  lens            faithful ChronoLens under ChronoMoE's policy (DESIGN §4)
  chrono          the chrono setpoint controller, chosen among CANDIDATES (two rounds) on seeds
                  0-2 only by SELECTION_RULE_R2 (reference: aux0.1 on the same seeds), then run on
                  the held-out seeds like every other arm (cache dir chrono-r2, or round 1's chrono
                  when both rounds chose the same); round 1's choice (SELECTION_RULE) is reported
                  too, as chrono-r1

Protocol: candidates run on seeds 0-2 (split "selection"); every arm (baselines and the
selected chrono setting) runs on held-out seeds 3-7 (split "heldout"), and only held-out
records enter the table. Every (workload, arm, seed) result is cached as JSON under
``benchmarks/results/governance_cache/`` so an interrupted sweep resumes where it stopped;
several workers may share the cache (a claim file per job).

    python benchmarks/governance.py --quick           # smoke run: 150 steps, seeds 0 and 1
    python benchmarks/governance.py                   # full sweep (resumes from the cache)
    python benchmarks/governance.py --workers 2 --worker 1   # a second process on the same sweep
    python benchmarks/governance.py --report          # only rebuild JSON + plot from the cache
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from governance_report import plot, records, selection_markdown, table_markdown  # noqa: E402
from governance_workloads import load_text, train_arm, workloads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SELECTION_SEEDS = (0, 1, 2)
HELDOUT_SEEDS = (3, 4, 5, 6, 7)
EVERY = 10   # snapshot window, steps

BASELINES = {
    "none": {"family": "none", "setting": {}},
    **{f"aux{a}": {"family": "aux", "setting": {"alpha": a}, "alpha": a} for a in (0.003, 0.01, 0.03, 0.1, 0.3)},
    **{f"bias{u}": {"family": "bias", "setting": {"rate": u}, "rate": u} for u in (0.005, 0.02, 0.08)},
    "lens": {"family": "lens", "setting": {"mode": "faithful", "actuators": ["lens"]},
             "govern": ("lens",), "config": {"mode": "faithful"}},
}
_PI = {"mode": "setpoint", "neff_target": 0.85}
CANDIDATES = {
    "chrono-pi-aux": {"govern": ("aux",), "config": _PI,
                      "kw": {"aux": {"alpha_min": 0.003, "alpha_max": 0.3}}},
    "chrono-pi-bias": {"govern": ("bias",), "config": _PI, "kw": {"bias": {"rate": 0.08}}},
    "chrono-pi-bias+aux": {"govern": ("bias", "aux"), "config": _PI,
                           "kw": {"bias": {"rate": 0.08}, "aux": {"alpha_min": 0.003, "alpha_max": 0.1}}},
    "chrono-pi-aux-t0.9": {"govern": ("aux",), "config": {**_PI, "neff_target": 0.9},
                           "kw": {"aux": {"alpha_min": 0.003, "alpha_max": 0.3}}},
}
for _c in CANDIDATES.values():
    _c["family"] = "chrono"
    _c["setting"] = {"actuators": list(_c["govern"]), **_c["config"], "actuator_kwargs": _c["kw"]}
SELECTION_RULE = ("among candidates whose mean worst-layer final Neff over seeds 0-2 is >= 0.8 n, "
                  "the lowest mean val loss; if none reaches it, the highest mean worst-layer final Neff")
ROUND1 = tuple(CANDIDATES)

# Round 2 (issue 18, second session): PI on the aux weight with a 2-step control period ("p2"),
# a bumpless start at alpha 0.1 ("b0.1": integral preset so alpha = 0.1 from step 0) and a
# small (kp, ki) search. Declared, with the rule below, before any round-2 run.
_AUX = {"aux": {"alpha_min": 0.003, "alpha_max": 0.3}}
I0_ALPHA_01 = round((0.1 - 0.003) / (0.3 - 0.003), 4)      # effort at which alpha = 0.1


def _aux_pi(period: int = EVERY, start: float = 0.0, kp: float = 2.0, ki: float = 0.2, t: float = 0.85):
    return {"govern": ("aux",), "config": {**_PI, "neff_target": t, "kp": kp, "ki": ki, "integral_init": start},
            "kw": _AUX, "control_every": period}


CANDIDATES.update({
    "chrono-pi-aux-p2": _aux_pi(period=2),
    "chrono-pi-aux-b0.1": _aux_pi(start=I0_ALPHA_01),
    "chrono-pi-aux-p2-b0.1": _aux_pi(period=2, start=I0_ALPHA_01),
    "chrono-pi-aux-p2-b0.1-kp2-ki0.04": _aux_pi(period=2, start=I0_ALPHA_01, ki=0.04),
    "chrono-pi-aux-p2-b0.1-kp4-ki0.04": _aux_pi(period=2, start=I0_ALPHA_01, kp=4.0, ki=0.04),
    "chrono-pi-aux-p2-b0.1-kp4-ki0.2": _aux_pi(period=2, start=I0_ALPHA_01, kp=4.0),
    "chrono-pi-aux-p2-b0.1-t0.9": _aux_pi(period=2, start=I0_ALPHA_01, t=0.9),
})
ROUND2 = tuple(c for c in CANDIDATES if c not in ROUND1)
for _n in ROUND2:
    _c = CANDIDATES[_n]
    _c["family"] = "chrono"
    _c["setting"] = {"actuators": list(_c["govern"]), **_c["config"], "actuator_kwargs": _c["kw"],
                     "control_every": _c["control_every"]}
# Time budget (2 shared cores, decided at 11:38 UTC before any qwen3-moe round-2 run): the gain /
# set-point variants run on byte-moe only, where round 1 missed the goal; qwen3-moe gets p2, b0.1, p2-b0.1.
BYTE_MOE_ONLY = ("chrono-pi-aux-p2-b0.1-kp2-ki0.04", "chrono-pi-aux-p2-b0.1-kp4-ki0.04",
                 "chrono-pi-aux-p2-b0.1-kp4-ki0.2", "chrono-pi-aux-p2-b0.1-t0.9")


def candidates_for(workload: str) -> list[str]:
    """The candidates (both rounds) that compete on ``workload``."""
    return [c for c in CANDIDATES if c not in BYTE_MOE_ONLY or workload != "qwen3-moe"]


REFERENCE = "aux0.1"   # DESIGN §6's toughest baseline, also run on the selection seeds (round 2 only)
SELECTION_RULE_R2 = (
    "round 2, over every candidate of rounds 1 and 2: eligible = mean val loss over seeds 0-2 at most "
    "the reference's (Switch aux alpha 0.1 on the same seeds) + sqrt(sem_c^2 + sem_ref^2); among the "
    "eligible, the highest mean worst-layer final Neff; if none is eligible, the lowest mean val loss")


def cache_path(cache: Path, workload: str, arm: str, seed: int) -> Path:
    return cache / workload / arm / f"seed{seed}.json"


def load_cached(cache: Path, workload: str, arm: str, seeds) -> list[dict]:
    out = []
    for s in seeds:
        p = cache_path(cache, workload, arm, s)
        if p.exists():
            out.append(json.loads(p.read_text()))
    return out


_ACTIVE_SELECTION = list(SELECTION_SEEDS)   # --quick selects on seed 0 only


def _sem(xs) -> float:
    return float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0


def eligibility(cache: Path, workload: str) -> dict[str, bool] | None:
    """Round 2: {candidate: eligible} (mean selection val loss within one SE of the reference's),
    or None until every selection run (candidates of both rounds and the reference) exists."""
    n = len(_ACTIVE_SELECTION)
    ref = [r["val_loss"] for r in load_cached(cache, workload, REFERENCE, _ACTIVE_SELECTION)]
    runs = {c: load_cached(cache, workload, c, _ACTIVE_SELECTION) for c in candidates_for(workload)}
    if len(ref) < n or any(len(rs) < n for rs in runs.values()):
        return None
    out = {}
    for name, rs in runs.items():
        loss = [r["val_loss"] for r in rs]
        out[name] = bool(np.mean(loss) <= np.mean(ref) + np.sqrt(_sem(loss) ** 2 + _sem(ref) ** 2))
    return out


def select(cache: Path, workload: str) -> str | None:
    """Round 2's chosen candidate for ``workload`` by SELECTION_RULE_R2, or None until every
    selection run (candidates of both rounds and the reference) exists."""
    ok = eligibility(cache, workload)
    if ok is None:
        return None
    scored = []
    for name, eligible in ok.items():
        rs = load_cached(cache, workload, name, _ACTIVE_SELECTION)
        scored.append((name, eligible, float(np.mean([min(r["final_neff"]) for r in rs])),
                       float(np.mean([r["val_loss"] for r in rs]))))
    eligible = [c for c in scored if c[1]]
    return max(eligible, key=lambda c: c[2])[0] if eligible else min(scored, key=lambda c: c[3])[0]


def select_r1(cache: Path, workload: str, n_experts: int = 8) -> str | None:
    """Round 1's chosen candidate (SELECTION_RULE over ROUND1), or None until its selection runs exist."""
    scored = []
    for name in ROUND1:
        rs = load_cached(cache, workload, name, _ACTIVE_SELECTION)
        if len(rs) < len(_ACTIVE_SELECTION):
            return None
        worst = float(np.mean([min(r["final_neff"]) for r in rs]))
        scored.append((name, worst, float(np.mean([r["val_loss"] for r in rs]))))
    ok = [s for s in scored if s[1] >= 0.8 * n_experts]
    return min(ok, key=lambda s: s[2])[0] if ok else max(scored, key=lambda s: s[1])[0]


def _jobs(wls, sel, held) -> list[tuple[str, str, int]]:
    out = []
    for w in wls:
        out += [(w, c, s) for s in sel for c in [*candidates_for(w), REFERENCE]]
        out += [(w, a, s) for s in held for a in [*BASELINES, "chrono", "chrono-r2"]]
    return out


def jobs(wls) -> list[tuple[str, str, int]]:
    """(workload, arm, seed) in run order, workload by workload: selection first (candidates and
    the reference), then held-out seed by seed (baselines, round 1's chrono, round 2's chrono-r2)."""
    return _jobs(wls, SELECTION_SEEDS, HELDOUT_SEEDS)


def chrono_dir(cache: Path, workload: str) -> str | None:
    """Cache directory of round 2's chosen arm on held-out seeds: ``chrono`` (round 1's runs) when
    round 2 chose what round 1 chose, else ``chrono-r2``; None until the choice is known."""
    chosen = select(cache, workload)
    if chosen is None:
        return None
    return "chrono" if chosen == select_r1(cache, workload) else "chrono-r2"


def spec_of(cache: Path, workload: str, arm: str) -> tuple[str, dict] | None:
    """(name, spec) for one job; None while chrono waits for its selection runs. A chrono-r2 job
    whose runs are round 1's (same choice) is never run: its spec says so with ``reuse``."""
    if arm in BASELINES:
        return arm, BASELINES[arm]
    if arm in CANDIDATES:
        return arm, CANDIDATES[arm]
    chosen = (select_r1 if arm == "chrono" else select)(cache, workload)
    if chosen and arm == "chrono-r2" and chrono_dir(cache, workload) == "chrono":
        return chosen, {"reuse": "chrono"}
    return (chosen, CANDIDATES[chosen]) if chosen else None


def _drop_stale_claim(claim: Path) -> None:
    """Remove a claim whose worker (pid on this host) is gone, e.g. after a killed sweep."""
    try:
        parts = claim.read_text().split()          # "host pid" (or just "pid": this host)
        host, pid = (parts[0], parts[1]) if len(parts) == 2 else (platform.node(), parts[0])
        if host == platform.node():
            os.kill(int(pid), 0)
            return
    except FileNotFoundError:
        return
    except (ProcessLookupError, ValueError, IndexError):
        pass
    except PermissionError:
        return                               # alive, another user's process
    claim.unlink(missing_ok=True)


def run_sweep(cache: Path, wls: dict, worker: int, workers: int, seeds_override=None) -> None:
    from tqdm import tqdm

    train, val = load_text()
    todo = jobs(list(wls)) if seeds_override is None else _jobs(list(wls), *seeds_override)
    bar = tqdm(total=len(todo), desc=f"governance sweep (worker {worker})", file=sys.stderr)
    pending = list(todo)
    while pending:
        progressed, waiting = False, []
        for job in pending:
            w, arm, seed = job
            out = cache_path(cache, w, arm, seed)
            if out.exists():
                bar.update(1)
                progressed = True
                continue
            spec = spec_of(cache, w, arm)
            if spec is None:
                waiting.append(job)          # chrono waits for its selection runs
                continue
            if "reuse" in spec[1]:           # round 2 chose round 1's arm: its held-out runs exist
                bar.update(1)
                progressed = True
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            claim = out.with_suffix(".claim")
            _drop_stale_claim(claim)
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                waiting.append(job)          # another worker runs it
                continue
            os.write(fd, f"{platform.node()} {os.getpid()}\n".encode())
            os.close(fd)
            try:
                name, s = spec
                load0 = os.getloadavg()[0]
                rec = train_arm(wls[w], s, seed, EVERY, train, val, arm=arm)
                rec.update(family=s["family"], setting=s["setting"],
                           chosen=name if arm in ("chrono", "chrono-r2") else None,
                           split="selection" if seed in _ACTIVE_SELECTION else "heldout",
                           load_start=load0, load_end=os.getloadavg()[0],
                           date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(rec))
                os.replace(tmp, out)
            finally:
                claim.unlink(missing_ok=True)
            bar.update(1)
            progressed = True
        pending = waiting
        if pending and not progressed:
            time.sleep(5)                    # another worker holds what is left
    bar.close()


def report(cache: Path, wls: dict, out: Path, quick: bool, heldout=HELDOUT_SEEDS) -> dict:
    recs, runs = records(cache, wls, sys.modules[__name__], _ACTIVE_SELECTION, heldout)
    png = plot(recs, out.with_suffix(".png"))
    doc = {
        "benchmark": "governance", "quick": quick,
        "protocol": {"selection_seeds": list(_ACTIVE_SELECTION), "heldout_seeds": list(heldout),
                     "selection_rule": SELECTION_RULE_R2, "selection_rule_round1": SELECTION_RULE,
                     "reference_on_selection_seeds": REFERENCE, "snapshot_every": EVERY,
                     "candidates": {k: v["setting"] for k, v in CANDIDATES.items()},
                     "round1_candidates": list(ROUND1), "round2_candidates": list(ROUND2),
                     "workloads": {k: vars(v) for k, v in wls.items()}},
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1,
                    "loadavg_at_report": os.getloadavg()},
        "records": recs, "runs": runs, "plot": png,
    }
    out.write_text(json.dumps(doc, indent=1))
    print(selection_markdown(recs))
    print(table_markdown(recs))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 150 steps, selection seed 0, held-out seed 1")
    p.add_argument("--workloads", default="byte-moe,qwen3-moe", help="comma list (default both)")
    p.add_argument("--worker", type=int, default=0, help="this worker's index (several may share the cache)")
    p.add_argument("--workers", type=int, default=1, help="(informational) how many workers run")
    p.add_argument("--report", action="store_true", help="only rebuild the JSON and plot from the cache")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machine)")
    p.add_argument("--steps", type=int, default=None, help="override the steps (testing only; "
                   "needs --cache so the real cache is never mixed)")
    p.add_argument("--cache", default=None, help="cache directory (default benchmarks/results/governance_cache[_quick])")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/governance_full.json "
                   "or governance_quick.json)")
    args = p.parse_args(argv)
    if args.steps is not None and args.cache is None:
        p.error("--steps needs --cache")
    all_wls = workloads(args.quick)
    if args.steps is not None:
        from dataclasses import replace

        all_wls = {k: replace(v, steps=args.steps) for k, v in all_wls.items()}
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in all_wls]
    if bad:
        p.error(f"unknown workloads {bad}; choose from {', '.join(all_wls)}")
    wls = {w: all_wls[w] for w in names}
    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else RESULTS / ("governance_cache_quick" if args.quick
                                                            else "governance_cache")
    seeds = None
    if args.quick:
        _ACTIVE_SELECTION[:] = [0]
        seeds = ((0,), (1,))
    if not args.report:
        run_sweep(cache, wls, args.worker, args.workers, seeds)
    out = Path(args.out) if args.out else RESULTS / ("governance_quick.json" if args.quick
                                                     else "governance_full.json")
    report(cache, wls, out, args.quick, heldout=(1,) if args.quick else HELDOUT_SEEDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
