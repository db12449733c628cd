"""The ``jaxcl`` command line.

Exit codes: 0 success; 1 the run failed; 2 bad input (recipe, override, paths), reported as one
message naming the culprit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXAMPLES = {
    "run": """examples:
  jaxcl run recipes/quickstart.yaml
  jaxcl run recipes/quickstart.yaml out_dir=/tmp/qs stages.1.steps_per_task=40
  jaxcl run recipes/quickstart.yaml 'stages.0.methods=[{name: l2_anchor, lam: 1.0}]'""",
    "methods": "example:\n  jaxcl methods",
    "report": "example:\n  jaxcl report runs/quickstart",
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
        "--overwrite",
        action="store_true",
        help="start afresh, replacing the run in out_dir (by default a run of the same recipe "
        "resumes from its latest checkpoint, and another recipe's run is refused)",
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
    return parser


def _run(args: argparse.Namespace) -> int:
    from jaxcl.recipe import load_recipe
    from jaxcl.report import write_report
    from jaxcl.train.runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_recipe(recipe, overwrite=args.overwrite)
    print(f"report: {write_report(recipe.out_dir)}")
    return 0


def _methods(_: argparse.Namespace) -> int:
    from jaxcl.methods import CATALOG

    width = max(map(len, CATALOG))
    for info in CATALOG.values():
        print(f"{info.name:<{width}}  {info.family:<15} {info.kind:<10} {info.summary}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from jaxcl.report import write_report

    print(write_report(args.run_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jaxcl.recipe import RecipeError
    from jaxcl.train.runner import RunDirError, TrainingDiverged

    handlers = {"run": _run, "methods": _methods, "report": _report}
    try:
        return handlers[args.command](args)
    except (RecipeError, RunDirError, FileNotFoundError) as err:
        print(f"jaxcl {args.command}: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"jaxcl {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
