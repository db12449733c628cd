"""Forgetting of the architecture-side methods against plain LoRA and full fine-tuning.

Two comparisons on the built-in ``test-micro`` model (random weights, byte tokenizer), every
run through ``jaxcl``'s recipe runner with the same budget (steps, batch, sequence length) and
scored by perplexity on held-out rows of each task:

* ``cit``: the bundled instruction tasks sentiment → capitals → antonyms. Full fine-tuning,
  plain LoRA (a fresh q/v adapter per task, folded in after it), soft prompts per task,
  Progressive Prompts, L2P, MoE-LoRA (an expert per task, and a pool of 3), InfLoRA, SAPT, and
  vocabulary expansion with only the new rows trained.
* ``cpt``: the bundled pretraining domains recipes → starlog. Full fine-tuning, plain LoRA
  (q, v, up, down), block expansion (LLaMA Pro, one identity block after every block) and
  DEMix (an FFN expert per domain, scored by the posterior mixture).

Columns: OP = mean ln-perplexity over the tasks after the last one (lower is better), BWT = mean
change of an earlier task's ln-perplexity since its own training, in nats, sign flipped so that
negative means forgotten (0: nothing forgotten), and the final ln-perplexity of each task::

    python scripts/arch_forgetting.py [--suite cit|cpt|all] [--steps 20] [--only NAME ...]
        [--preset tiny] [--metric exact_match]

Learning rates: weights and adapters 1e-2 (CIT) or 5e-3 (CPT); prompts 0.3, the rate of the
Progressive Prompts code for prompt tuning. A random-weight model learns little through
prompts or adapters alone, so OP favours full fine-tuning here; the table is about forgetting.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

CIT = ("sentiment", "capitals", "antonyms")
CPT = ("recipes", "starlog")


def recipe(
    name: str,
    out: Path,
    suite: str,
    steps: int,
    *,
    preset: str = "test-micro",
    metric: str = "perplexity",
    model: dict | None = None,
    stage: dict | None = None,
    lr: float,
) -> dict[str, Any]:
    """One single-stage run of ``suite`` (``cit`` or ``cpt``) with ``model`` and ``stage``
    fields added to the shared set-up."""
    if suite == "cit":
        shape = {"kind": "instruct", "seq_len": 48, "batch_size": 16, "eval_batch_size": 48}
        tasks = [(t, f"cit/{t}", 48) for t in CIT]
    else:
        shape = {"kind": "pretrain", "seq_len": 64, "batch_size": 8}
        tasks = [(d, f"cpt/{d}", 32) for d in CPT]
    return {
        "name": name,
        "out_dir": str(out / suite / name),
        "seed": 0,
        "probes": False,
        "model": {"preset": preset, **(model or {})},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "optimizer": {"lr": lr, "warmup_steps": 3, "schedule": "constant", "weight_decay": 0.0},
        "stages": [
            {
                "name": suite,
                **shape,
                "steps_per_task": steps,
                "metric": metric,
                "tasks": [
                    {"name": n, "data": {"bundled": b, "train_size": 500, "eval_size": e}}
                    for n, b, e in tasks
                ],
                **(stage or {}),
            }
        ],
    }


def cit_variants(
    out: Path, steps: int, full_lr: float | None = None, **setup: Any
) -> dict[str, dict[str, Any]]:
    lr, prompt_lr = 1e-2, 0.3
    lora = {"rank": 8, "targets": ["q", "v"]}
    experts = {"experts": 3, "rank": 8, "alpha": 16.0, "targets": ["q", "v"]}

    def run(name: str, rate: float = lr, **fields: Any) -> dict[str, Any]:
        return recipe(name, out, "cit", steps, lr=rate, **setup, **fields)

    def prompts(kind: str, count: int, **extra: Any) -> dict[str, Any]:
        return {"prompts": {"kind": kind, "count": count, "length": 8, **extra}}

    def methods(*entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"methods": list(entries), **extra}

    return {
        "full": run("full", full_lr or lr),
        "lora": run("lora", stage={"lora": lora}),
        "soft_prompt": run(
            "soft_prompt",
            prompt_lr,
            model=prompts("per_task", 3),
            stage=methods({"name": "soft_prompt"}),
        ),
        "progressive_prompts": run(
            "progressive_prompts",
            prompt_lr,
            model=prompts("progressive", 3),
            stage=methods({"name": "progressive_prompts"}),
        ),
        "l2p": run(
            "l2p",
            prompt_lr,
            model=prompts("pool", 6, top_k=2),
            stage=methods({"name": "l2p", "lam": 0.1}),
        ),
        "moe_lora (per task)": run(
            "moe_lora_task",
            model={"moe_lora": experts},
            stage=methods({"name": "moe_lora", "mode": "per_task"}),
        ),
        "moe_lora (pool)": run(
            "moe_lora_pool",
            model={"moe_lora": experts},
            stage=methods({"name": "moe_lora", "mode": "pool"}),
        ),
        "inflora": run("inflora", stage=methods({"name": "inflora", "batches": 4}, lora=lora)),
        "sapt": run(
            "sapt",
            model={"sapt": {"tasks": 3, "rank": 8, "alpha": 16.0, "samples": 16}},
            stage=methods({"name": "sapt", "max_new_tokens": 24}),
        ),
        "new_tokens": run(
            "new_tokens",
            model={"add_tokens": {"tokens": ["<pos>", "<neg>", "<capital>", "<antonym>"]}},
            stage=methods({"name": "new_tokens"}),
        ),
    }


def cpt_variants(
    out: Path, steps: int, full_lr: float | None = None, **setup: Any
) -> dict[str, dict[str, Any]]:
    lr = 5e-3

    def run(name: str, rate: float = lr, **fields: Any) -> dict[str, Any]:
        return recipe(name, out, "cpt", steps, lr=rate, **setup, **fields)

    return {
        "full": run("full", full_lr or lr),
        "lora": run("lora", stage={"lora": {"rank": 8, "targets": ["q", "v", "up", "down"]}}),
        "block_expansion": run(
            "block_expansion",
            model={"expand": {"every": 1}},
            stage={"methods": [{"name": "block_expansion"}]},
        ),
        "demix": run(
            "demix",
            model={"demix": {"experts": 2}},
            stage={"methods": [{"name": "demix", "prior_sequences": 32}]},
        ),
    }


def table(suite: str, rows: list[tuple], metric: str) -> str:
    names = CIT if suite == "cit" else CPT
    log = metric == "perplexity"
    unit = ("mean ln ppl", "nats", "ln ppl") if log else (metric, metric, metric)
    lines = [
        f"| {suite} method | OP ({unit[0]}) | BWT ({unit[1]}) "
        f"| final {unit[2]} ({', '.join(names)}) | seconds |",
        "|---|---|---|---|---|",
    ]
    for label, op, bwt, last, secs in rows:
        final = ", ".join(f"{math.log(x) if log else x:.2f}" for x in last)
        lines.append(f"| {label} | {op:.2f} | {bwt:+.3f} | {final} | {secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    from jaxcl.recipe import validate
    from jaxcl.train.runner import run_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("cit", "cpt", "all"), default="all")
    parser.add_argument("--steps", type=int, default=20, help="steps per task")
    parser.add_argument("--out", type=Path, default=Path("/tmp/arch_forgetting"))
    parser.add_argument("--preset", default="test-micro", help="built-in model")
    parser.add_argument(
        "--full-lr", type=float, help="full fine-tuning's rate (default: the suite's)"
    )
    parser.add_argument(
        "--metric", default="perplexity", help="CIT score (CPT is always perplexity)"
    )
    parser.add_argument("--only", nargs="*", help="run these variants only")
    args = parser.parse_args()
    suites = ("cit", "cpt") if args.suite == "all" else (args.suite,)
    summary: dict[str, dict[str, Any]] = {}
    for suite in suites:
        metric = args.metric if suite == "cit" else "perplexity"
        build = cit_variants if suite == "cit" else cpt_variants
        variants = build(args.out, args.steps, args.full_lr, preset=args.preset, metric=metric)
        rows = []
        for label, raw in variants.items():
            if args.only and label not in args.only:
                continue
            start = time.perf_counter()
            result = run_recipe(validate(raw), overwrite=True)["stages"][0]
            m = result["metrics"]
            rows.append((label, m["op"], m["bwt"], result["R"][-1], time.perf_counter() - start))
            summary.setdefault(suite, {})[label] = {"op": m["op"], "bwt": m["bwt"]}
        print(f"\n{suite}: {args.preset}, {args.steps} steps per task, {metric}\n")
        print(table(suite, rows, metric))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
