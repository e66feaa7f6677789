"""Where does each technique win on one device? Plans a list of cases (the paper's models, the
presets at realistic shapes: long sequences, high resolutions, tight cards) with every single-device
technique and records the verdict of each: the decision, the recommended technique (with its
micro-batch and accumulation steps), the runner-up among the alternatives, and the DiffusionBlocks
configuration the rules compared. Writes reports/verdict-search.json and .md.

    python scripts/verdict_search.py                 # every case (an hour or more on 2 cores)
    python scripts/verdict_search.py --only vit-l16  # cases whose model name contains the text
    python scripts/verdict_search.py --rejudge       # only the saved plans, judged again (rules changed)
    python scripts/verdict_search.py --replan        # plan every case again (saved plans are reused otherwise)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dbprofile import plan
from dbprofile.loading import load_sweep
from dbprofile.results import Plan, PlanEntry
from dbprofile.units import GiB
from dbprofile.verdict import judge

TECHNIQUES = ["e2e", "ckpt", "sac", "sac:alt", "offload", "db:2", "db:3", "db:4"]

# (model, batch, GPU, options): the showcase, the verdict doc's cases, a micro-batch floor
# (a team that will not go below it), and shapes where one sample's activations are large.
CASES = [
    ("vit-l16", 64, "RTX-4090-24GB", {}),
    ("vit-l16", 256, "RTX-4090-24GB", {"min_micro_batch": 128}),
    ("dit-xl2", 64, "RTX-4090-24GB", {}),
    ("gpt2-small", 18, "RTX-4090-24GB", {}),
    ("vit-l16", 2, "H100-80GB", {"image_sizes": [2048], "precision": "bf16"}),
    ("dit-b2", 256, "L4-24GB", {}),
    ("llama-7b", 2, "H100-80GB", {}),
]


def plan_case(model: str, batch: int, gpu: str, shape: dict) -> Plan:
    _, specs = load_sweep(model, {}, shape.get("seq_lens"), shape.get("image_sizes"))
    started = time.perf_counter()
    p = plan(
        specs[0],
        batch,
        device=gpu,
        techniques=TECHNIQUES,
        min_micro_batch=shape.get("min_micro_batch", 1),
        precision=shape.get("precision", "fp32"),
        # The for-loop AdamW: the implementation whose plans were checked against an H200 (a GPU plan's
        # default is now the foreach step, whose temporaries cover all parameters at once).
        optimizer=shape.get("optimizer", "adamw-loop"),
    )
    p.elapsed_s = time.perf_counter() - started
    return p


def plan_from_dict(data: dict) -> Plan:
    fields = {k: v for k, v in data.items() if k not in ("entries", "verdict")}
    return Plan(**fields, entries=[PlanEntry(**e) for e in data["entries"]])


def summary(model: str, batch: int, gpu: str, shape: dict, p: Plan) -> dict:
    v = judge(p)
    alternatives = next((r.numbers for r in v.reasons if r.rule == "alternatives"), {})
    entries = {
        e.technique: {
            "peak_gib": round(e.peak_bytes / GiB, 2) if e.ok else None,
            "fits": e.fits,
            "max_batch_size": e.max_batch_size,
            "micro_batch_size": e.micro_batch_size,
            "accumulation_steps": e.accumulation_steps,
            "flops_per_sample": e.flops_per_sample,
            "exposed_transfer_s_per_sample": e.exposed_transfer_s_per_sample,
            "error": e.error,
        }
        for e in p.entries
    }
    return {
        "model": model,
        "shape": shape,
        "batch_size": batch,
        "gpu": gpu,
        "decision": v.decision,
        "recommended": v.recommended,
        "micro_batch": v.recommended_micro_batch,
        "accumulation_steps": v.recommended_accumulation_steps,
        "runner_up": alternatives.get("runner_up"),
        "diffusion_blocks": v.best_technique,
        "headline": v.headline,
        "entries": entries,
        "plan_s": round(p.elapsed_s or 0.0, 1),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Where each technique wins on one device (scripts/verdict_search.py)",
        "",
        "| model | shape | batch | GPU | decision | recommended | runner-up | DiffusionBlocks compared |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = ", ".join(f"{k.removesuffix('s')} {v[0] if isinstance(v, list) else v}" for k, v in r["shape"].items())
        shape = shape or "preset"
        rec = r["recommended"] or "none"
        if (r["accumulation_steps"] or 1) > 1:
            rec += f" ({r['accumulation_steps']} x {r['micro_batch']})"
        lines.append(
            f"| {r['model']} | {shape} | {r['batch_size']} | {r['gpu']} | {r['decision']} | {rec} | "
            f"{r['runner_up'] or '-'} | {r['diffusion_blocks'] or '-'} |"
        )
    lines += ["", "Headlines:", ""] + [f"- {r['model']} b{r['batch_size']} {r['gpu']}: {r['headline']}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="only cases whose model name contains this")
    parser.add_argument("--out", default="reports/verdict-search", help="output path without extension")
    parser.add_argument("--rejudge", action="store_true", help="judge the saved plans again instead of planning")
    parser.add_argument("--replan", action="store_true", help="plan every case again, saved or not")
    args = parser.parse_args()
    plans_path = Path(args.out + "-plans.json")
    saved = json.loads(plans_path.read_text()) if plans_path.exists() else {}
    rows = []
    for model, batch, gpu, shape in CASES:
        if args.only and args.only not in model:
            continue
        key = f"{model} b{batch} {gpu} {json.dumps(shape, sort_keys=True)}"
        if key in saved and not args.replan:
            p = plan_from_dict(saved[key])
        elif args.rejudge:
            continue
        else:
            print(f"planning {key}", flush=True)
            p = plan_case(model, batch, gpu, shape)
            saved[key] = p.to_dict()
            plans_path.write_text(json.dumps(saved, indent=1, default=str))
        rows.append(summary(model, batch, gpu, shape, p))
        print(f"  {rows[-1]['decision']}: {rows[-1]['headline']}", flush=True)
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
        Path(args.out + ".md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
