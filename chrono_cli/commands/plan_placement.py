"""``chrono plan-placement RUN --gpus G``: replicate and place experts on GPUs from recorded
loads (DeepSeek EPLB's hierarchical balancing, see ``chrono.analysis.placement``), and
report the predicted max / mean GPU load per layer before (trivial placement) and after.
No torch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FILES = {"chrono": "placement.json", "sglang": "sglang_init_expert_location.json",
         "vllm": "vllm_eplb_state.json", "vllm_map": "vllm_initial_expert_map.json"}


def cmd_plan_placement(args) -> int:
    import chrono
    from chrono.analysis import AnalysisError, Scope, parse_steps
    from chrono.analysis.placement_io import (chrono_json, plan_run, sglang_json, vllm_initial_map,
                                              vllm_json)
    from chrono_cli.common import UserError, print_table, refuse_inside_store
    from chrono.store import require_run

    if args.max_rows < 1:
        raise UserError("--max-rows must be >= 1")
    require_run(args.root, args.run)
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a directory")
    if out is not None:
        refuse_inside_store(out, args.root, "--output")
    try:
        scope = Scope(args.run, parse_steps(args.steps), args.layer, args.mode)
        rep = plan_run(chrono.connect(args.root), scope, args.gpus, replicas=args.replicas,
                       groups=args.groups, nodes=args.nodes, method=args.method)
        docs = {"chrono": chrono_json(rep), "sglang": sglang_json(rep, args.model_layers),
                "vllm": vllm_json(rep), "vllm_map": vllm_initial_map(rep)}
    except AnalysisError as e:
        raise UserError(str(e)) from None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for key, name in FILES.items():
            (out / name).write_text(json.dumps(docs[key]) + "\n")
    if args.format == "json":
        sys.stdout.write(json.dumps(docs["chrono"]) + "\n")
    else:
        s = rep.summary()
        n_exp = rep.weight.shape[1]
        print(f"placement of run {args.run} ({scope.describe()}): {s['layers']} layers x "
              f"{n_exp} experts + {args.replicas} replicas on {args.gpus} GPUs "
              f"({s['nodes']} node{'s' if s['nodes'] != 1 else ''}, {s['policy']} policy)")
        print(f"predicted token assignments per GPU: before = trivial placement (slot p holds expert "
              f"p mod {n_exp}), after = this plan; ratio = busiest GPU / mean GPU (1 = balanced)")
        print_table(rep.table(), max_rows=args.max_rows,
                    more="--max-rows N, or --format json for all")
        if s["mean_before_ratio"] is not None:
            print(f"\nbusiest / mean GPU load, mean over layers: {s['mean_before_ratio']:.3f} with the "
                  f"trivial placement, {s['mean_after_ratio']:.3f} with this plan")
        if out is None:
            print("write the files for SGLang and vLLM (and placement.json) with -o DIR")
    if out is not None:
        print(f"wrote {', '.join(str(out / n) for n in FILES.values())}", file=sys.stderr)
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "plan-placement", help="plan expert replicas and GPU placement from recorded loads (EPLB)",
        description="Sums the run's routing rows per layer and expert over --steps, replicates the "
                    "hottest experts and packs replicas onto GPUs to minimise the busiest GPU's load "
                    "(DeepSeek EPLB's hierarchical policy: groups to nodes, replicas to hot experts, "
                    "replicas to GPUs). Prints predicted max and mean GPU load per layer before "
                    "(trivial placement: slot p holds expert p mod E) and after. --output DIR writes "
                    "placement.json (chrono), sglang_init_expert_location.json (for SGLang's "
                    "--init-expert-location), vllm_eplb_state.json (vLLM EPLB state tensors) and "
                    "vllm_initial_expert_map.json (per-MoE-layer map, vLLM PR #49572's "
                    "eplb_config.initial_expert_map_path).")
    s.add_argument("run")
    s.add_argument("--gpus", type=int, required=True, help="GPUs (expert-parallel ranks)")
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--replicas", type=int, default=0,
                   help="redundant experts per layer (default 0); experts + replicas must be a "
                        "multiple of --gpus")
    s.add_argument("--groups", type=int, default=1,
                   help="expert groups (group-limited routing, e.g. 8 for DeepSeek-V3; default 1)")
    s.add_argument("--steps", help="step range START:STOP of the loads, stop excluded (default: all)")
    s.add_argument("--layer", type=int, help="plan one layer only")
    s.add_argument("--mode", choices=["TRAIN", "EVAL", "INFER"], help="loads of one mode only")
    s.add_argument("--method", choices=["auto", "eplb", "exact"], default="auto",
                   help="eplb; exact (tiny layers, one node); auto = exact when tiny, else eplb")
    s.add_argument("--model-layers", type=int,
                   help="layers of the model for the SGLang file (default: last recorded layer + 1)")
    s.add_argument("--output", "-o", help="directory for the placement files")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.add_argument("--max-rows", type=int, default=100, help="rows shown in table format")
    s.set_defaults(func=cmd_plan_placement)
