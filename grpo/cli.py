"""`grpo train | sft | reward | report`. Thin: parse, then import the heavy modules.

User errors (bad recipe key, missing file, unknown reward) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="GRPO post-training for LLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run GRPO from a recipe")
    train.add_argument("recipe")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")

    sft = commands.add_parser("sft", help="supervised warm-up from a recipe's data and sft section")
    sft.add_argument("recipe")
    sft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    reward = commands.add_parser("reward", help="score completions offline")
    reward.add_argument("name", help="registry name, pkg.module:fn or path/file.py:fn")
    reward.add_argument("--input", required=True, help="JSONL with 'completion' and the sample's fields")
    reward.add_argument("--output", default="-", help="JSONL out (default stdout)")
    reward.add_argument("--timeout", type=float, default=10.0)
    reward.add_argument("--workers", type=int, default=2)

    report = commands.add_parser("report", help="plot a run's curves")
    report.add_argument("run_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from grpo.errors import ParityError

    try:
        return _dispatch(args)
    except ValueError as error:  # RecipeError and every other user-facing ValueError
        print(f"grpo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ParityError as error:  # the run stopped itself: broken weight sync, not a user error
        print(f"grpo {args.command}: stopped: {error}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    from pathlib import Path

    if args.command == "train":
        from grpo.config import load_recipe
        from grpo.orchestrator import before_after_table, train

        summary = train(load_recipe(args.recipe, args.overrides), ray_address=args.ray_address)
        print(before_after_table(summary))
    elif args.command == "sft":
        from grpo.config import load_recipe
        from grpo.sft import sft

        summary = sft(load_recipe(args.recipe, args.overrides))
        print(f"sft: loss {summary['final_loss']:.4f}; checkpoint {summary['checkpoint']}")
    elif args.command == "reward":
        from grpo.rewards.offline import score_file

        score_file(args.name, Path(args.input), args.output, args.workers, args.timeout)
    elif args.command == "report":
        from grpo.metrics import plot_run

        print(plot_run(Path(args.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
