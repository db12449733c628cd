"""The ``jaxcl`` command line.

Exit codes: 0 success; 1 the run failed; 2 bad input (recipe, override, paths), reported as one
message naming the culprit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXAMPLES = {
    "run": """examples:
  jaxcl run recipes/quickstart.yaml
  jaxcl run recipes/quickstart.yaml out_dir=/tmp/qs stages.1.steps_per_task=40
  jaxcl run recipes/quickstart.yaml --dry-run model.preset=llama-3-8b
  jaxcl run recipes/quickstart.yaml 'stages.0.methods=[{name: l2_anchor, lam: 1.0}]'
  # two processes (on a pod or cluster, JAXCL_DISTRIBUTED=auto detects them instead):
  jaxcl run RECIPE --coordinator host0:8476 --num-processes 2 --process-id 0""",
    "prepare": """examples:
  jaxcl prepare recipes/trace.yaml           # tokenize every file-sourced task once
  jaxcl prepare recipes/trace.yaml model.source=/models/smollm2-hf --force""",
    "methods": "example:\n  jaxcl methods",
    "eval": """example:
  jaxcl eval runs/quickstart/checkpoints/cit/120 recipes/quickstart.yaml
  jaxcl eval runs/quickstart/checkpoints/cit/120 recipes/quickstart.yaml --json scores.json
  jaxcl eval runs/quickstart/checkpoints/cit/120 recipes/quickstart.yaml \\
      --lm-eval my_task --lm-eval-include tasks/ --lm-eval-limit 100""",
    "report": """examples:
  jaxcl report runs/quickstart
  # the run's R beside TRACE's published ones (Tables 8, 13, 18), OP and BWT of both:
  jaxcl report runs/trace --published tests/fixtures/trace_published.yaml""",
    "convert": """examples:
  jaxcl convert /path/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-hf
  jaxcl convert /tmp/smollm2-hf /tmp/smollm2.gguf --dtype float32
  # vocabulary expansion: new tokens (one a line) as new rows, the tokenizer extended too
  jaxcl convert tiny /tmp/tiny-tools --add-tokens tools.txt --pad-to-multiple-of 64""",
    "merge": """examples:
  jaxcl merge merge.yaml              # the config: docs/methods.md, "jaxcl merge"
  jaxcl merge merge.yaml --overwrite  # replace an existing output folder""",
    "bench": """examples:
  jaxcl bench --preset tiny --batch 8 --seq 256
  jaxcl bench --preset tiny --method ewc --method agem
  jaxcl bench --preset smollm2-135m --batch 4 --seq 256 --compare torch
  jaxcl bench --preset tiny --batch 16 --seq 96 --compare torch --dtype both --memory
  jaxcl bench --load smollm2-135m-instruct   # load time and forward tokens/s of real weights
  jaxcl bench --boundary --preset tiny --seq 64   # per-example Fisher / MAS cost per 1,000""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcl", description="Continual learning for LLMs in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    run = sub.add_parser("run", help="run a recipe", epilog=EXAMPLES["run"], formatter_class=fmt)
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument("overrides", nargs="*", help="key.path=value overrides of recipe fields")
    run.add_argument(
        "--dry-run", action="store_true", help="print the plan (steps, memory per device) and stop"
    )
    run.add_argument("--coordinator", help="multi-process: the coordinator's host:port")
    run.add_argument("--num-processes", type=int, help="multi-process: how many processes")
    run.add_argument("--process-id", type=int, help="multi-process: this process's index")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh, replacing the run in out_dir (by default a run of the same recipe "
        "resumes from its latest checkpoint, and another recipe's run is refused)",
    )

    evaluate = sub.add_parser(
        "eval",
        help="score a checkpoint on a recipe's tasks",
        epilog=EXAMPLES["eval"],
        formatter_class=fmt,
    )
    evaluate.add_argument("checkpoint", help="a step folder: OUT/checkpoints/<stage>/<step>")
    evaluate.add_argument("recipe", help="the recipe whose tasks (and model) to use")
    evaluate.add_argument("overrides", nargs="*", help="key.path=value overrides")
    evaluate.add_argument("--json", help="also write the scores to this JSON file")
    evaluate.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="also score lm-evaluation-harness tasks (comma-separated names; needs the "
        "lm-eval extra)",
    )
    evaluate.add_argument(
        "--lm-eval-limit", type=int, metavar="N", help="documents per lm-eval task (default all)"
    )
    evaluate.add_argument(
        "--lm-eval-include", metavar="DIR", help="a folder of local lm-eval task YAMLs"
    )

    prepare = sub.add_parser(
        "prepare",
        help="tokenize a recipe's file-sourced tasks once into ArrayRecord shards beside the data",
        epilog=EXAMPLES["prepare"],
        formatter_class=fmt,
    )
    prepare.add_argument("recipe", help="path to a recipe YAML file")
    prepare.add_argument("overrides", nargs="*", help="key.path=value overrides of recipe fields")
    prepare.add_argument(
        "--force", action="store_true", help="re-tokenize even where the prepared data is fresh"
    )

    sub.add_parser(
        "methods", help="list the method catalog", epilog=EXAMPLES["methods"], formatter_class=fmt
    )
    report = sub.add_parser(
        "report",
        help="write report.md for a run folder",
        epilog=EXAMPLES["report"],
        formatter_class=fmt,
    )
    report.add_argument("run_dir")
    report.add_argument(
        "--published",
        action="append",
        metavar="FILE",
        help="a YAML/JSON file of published R matrices (tasks, R, source; docs/metrics.md): "
        "print each beside the run's stage with its tasks, with OP and BWT of both, and add it "
        "to report.md (repeatable)",
    )

    bench = sub.add_parser(
        "bench", help="time the train step", epilog=EXAMPLES["bench"], formatter_class=fmt
    )
    bench.add_argument("--preset", default="tiny", help="model preset (shape)")
    bench.add_argument("--batch", type=int, default=8, help="sequences per step")
    bench.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    bench.add_argument("--method", action="append", default=[], help="add a CL method (repeatable)")
    bench.add_argument("--compare", choices=["torch"], help="also time transformers + torch")
    bench.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps, compile included")
    bench.add_argument(
        "--peak-flops",
        type=float,
        help="device peak FLOP/s, for MFU (default: the device's dense bf16 peak if known)",
    )
    bench.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "both"],
        default="fp32",
        help="compute dtype of the rows (bf16: float32 weights; torch under autocast)",
    )
    bench.add_argument(
        "--memory", action="store_true", help="print each row's peak memory (own process)"
    )
    bench.add_argument("--threads", type=int, help="torch threads (default: every core)")
    bench.add_argument(
        "--load", metavar="SOURCE", help="instead: time loading SOURCE and its forward pass"
    )
    bench.add_argument(
        "--boundary",
        action="store_true",
        help="instead: time the per-example Fisher and MAS importance (s per 1,000 examples)",
    )

    convert = sub.add_parser(
        "convert",
        help="convert between HF directories and GGUF files",
        epilog=EXAMPLES["convert"],
        formatter_class=fmt,
    )
    convert.add_argument("src", help="HF directory, .gguf file or preset name")
    convert.add_argument("dst", help="output: a directory (HF) or a path ending in .gguf")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    convert.add_argument(
        "--add-tokens",
        metavar="FILE",
        help="vocabulary expansion: add the tokens of FILE (one a line) to the tokenizer and as "
        "new rows (mean of their sub-tokens' rows); the extended tokenizer is written too",
    )
    convert.add_argument(
        "--pad-to-multiple-of", type=int, metavar="N", help="with --add-tokens: pad vocab_size"
    )

    merge = sub.add_parser(
        "merge",
        help="merge HF directories or checkpoints (linear, task arithmetic, TIES, DARE, SLERP)",
        epilog=EXAMPLES["merge"],
        formatter_class=fmt,
    )
    merge.add_argument("config", help="a merge config YAML file (method, base, models, out...)")
    merge.add_argument(
        "--overwrite", action="store_true", help="replace the output folder if it exists"
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    from jaxcl import parallel
    from jaxcl.compare import run_with_variants
    from jaxcl.recipe import load_recipe
    from jaxcl.report import write_report
    from jaxcl.train.runner import claim_run_dir

    recipe = load_recipe(args.recipe, args.overrides)  # bad recipes fail before any device work
    if args.dry_run:
        import jax

        from jaxcl.plan import format_plan, plan

        # A multi-host launch plans for every process's devices (assumed alike).
        devices = args.num_processes * jax.local_device_count() if args.num_processes else None
        print(format_plan(plan(recipe, devices)))
        for name in recipe.compare:
            print(f"\nvariant {name} ({recipe.compare[name]}):")
            print(format_plan(plan(recipe.variant(name), devices)))
        return 0
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    with claim_run_dir(Path(recipe.out_dir)):  # the report too is written under the run's lock
        run_with_variants(recipe, overwrite=args.overwrite)
        if parallel.is_primary():
            print(f"report: {write_report(recipe.out_dir)}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from jaxcl.data.prepare import prepare_recipe
    from jaxcl.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    # progress bars on stderr, so stdout holds only the one line per task
    for summary in prepare_recipe(recipe, Console(stderr=True), force=args.force):
        print(summary.line())
    return 0


def _methods(_: argparse.Namespace) -> int:
    from jaxcl.methods import CATALOG

    width = max(map(len, CATALOG))
    for info in CATALOG.values():
        print(f"{info.name:<{width}}  {info.family:<15} {info.kind:<10} {info.summary}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from jaxcl.report import load_results, published_comparisons, write_report

    # every published file is read and checked against the run before report.md is written
    compared = published_comparisons(load_results(args.run_dir), args.published or ())
    path = write_report(args.run_dir, published=args.published)
    for _, markdown in compared:
        print(markdown)
    print(path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from jaxcl.bench import bench, format_table

    if args.load:
        from jaxcl.models.bench import bench_model

        figures = bench_model(args.load, batch=args.batch, seq=args.seq, steps=args.steps)
        for key, value in figures.items():
            print(f"{key}: {value}")
        return 0
    if args.boundary:
        from jaxcl.bench import boundary_costs, format_boundary

        costs = boundary_costs(
            (args.preset,), ("fisher", "mas"), seq_len=args.seq, batch_size=args.batch
        )
        print(format_boundary(costs, f"task-boundary estimates: preset {args.preset}"))
        return 0

    timings = bench(
        args.preset,
        batch_size=args.batch,
        seq_len=args.seq,
        methods=args.method,
        compare_torch=args.compare == "torch",
        warmup=args.warmup,
        steps=args.steps,
        peak_flops=args.peak_flops,
        dtypes=("fp32", "bf16") if args.dtype == "both" else (args.dtype,),
        threads=args.threads,
    )
    import jax

    from jaxcl.bench import default_peak_flops

    peak = args.peak_flops or default_peak_flops(jax.devices()[0].device_kind)
    title = (
        f"jaxcl bench: preset {args.preset}, batch {args.batch}x{args.seq}, "
        f"{jax_devices()} (median of {args.steps} steps, each row in its own process; "
        + (f"MFU against {peak:.3g} FLOP/s)" if peak else "no MFU: pass --peak-flops)")
    )
    print(format_table(timings, title, memory=args.memory))
    for dtype in dict.fromkeys(t.dtype for t in timings):
        same = [t for t in timings if t.dtype == dtype]
        if args.compare == "torch" and len(same) > 1:
            ratio = same[0].tokens_per_s / same[-1].tokens_per_s
            print(f"\n{dtype}: jaxcl adamw / transformers+torch adamw, tokens/s: {ratio:.2f}x")
    return 0


def jax_devices() -> str:
    import jax

    devices = jax.devices()
    return f"{len(devices)} x {devices[0].device_kind}"


def _eval(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from jaxcl.evaluate import evaluate, print_evaluation
    from jaxcl.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    console = Console()
    harness = None
    if args.lm_eval:
        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        harness = {
            "tasks": tasks,
            "limit": args.lm_eval_limit,
            "include_path": args.lm_eval_include,
        }
    result = evaluate(recipe, args.checkpoint, console, lm_eval=harness)
    print_evaluation(console, result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from jaxcl.convert import convert_main

    return convert_main(
        args.src,
        args.dst,
        dtype=args.dtype,
        add_tokens=args.add_tokens,
        pad_to_multiple_of=args.pad_to_multiple_of,
    )


def _merge(args: argparse.Namespace) -> int:
    from jaxcl.merging import merge_main

    return merge_main(args.config, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options: run R --dry-run a.b=1
    if args.command in ("run", "eval", "prepare"):
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if x not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from jaxcl.recipe import RecipeError
    from jaxcl.train.runner import RunDirError, TrainingDiverged

    handlers = {
        "run": _run,
        "prepare": _prepare,
        "methods": _methods,
        "report": _report,
        "bench": _bench,
        "convert": _convert,
        "eval": _eval,
        "merge": _merge,
    }
    try:
        return handlers[args.command](args)
    except (RecipeError, RunDirError, FileNotFoundError, ValueError) as err:
        print(f"jaxcl {args.command}: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"jaxcl {args.command}: {err}", file=sys.stderr)
        return 1


def console_main() -> int:
    """The ``jaxcl`` command: :func:`main` in a process under jaxcl's host allocator settings
    (:mod:`jaxcl.host`), re-executed once to get them."""
    from jaxcl.host import reexec_with_allocator

    reexec_with_allocator(sys.argv[1:])
    try:
        return main()
    except BrokenPipeError:  # `jaxcl methods | head`: the reader left before the end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0


if __name__ == "__main__":
    sys.exit(console_main())
