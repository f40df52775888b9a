"""`grpo train | sft | reward | eval | export-fp8 | report`. Thin: parse, then import the heavy modules.

User errors (bad recipe key, missing file, unknown reward) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys

KIND_NAMES = {int: "an integer", float: "a number"}


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line, as the commands' own: the usage block is one `-h` away."""

    commands: dict[str, argparse.ArgumentParser]  # the top level's: each command's own parser

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _number(kind: type, low: float, *, above: bool = False, high: float | None = None):
    """An argparse type: `kind` of the text, refused (exit 2, naming the option) outside the bounds."""
    bounds = (f"more than {low}" if above else f"at least {low}") + (f" and at most {high}" if high else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {KIND_NAMES[kind]}") from None
        if (
            not math.isfinite(value)
            or value < low
            or (above and value == low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"{text}: must be {bounds}")
        return value

    return parse


def _parser() -> _Parser:
    parser = _Parser(prog="grpo", description="GRPO post-training for LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.commands = commands.choices

    train = commands.add_parser("train", help="run GRPO from a recipe")
    train.add_argument("recipe")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    train.add_argument(
        "--resume", action="store_true", help="continue the recipe's run from its latest checkpoint"
    )

    sft = commands.add_parser("sft", help="supervised warm-up from a recipe's data and sft section")
    sft.add_argument("recipe")
    sft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    reward = commands.add_parser("reward", help="score completions offline")
    reward.add_argument("name", help="registry name, pkg.module:fn or path/file.py:fn")
    reward.add_argument("--input", required=True, help="JSONL with 'completion' and the sample's fields")
    reward.add_argument("--output", default="-", help="JSONL out (default stdout)")
    reward.add_argument("--timeout", type=_number(float, 0, above=True), default=10.0)
    reward.add_argument("--workers", type=_number(int, 1), default=2)

    evaluate = commands.add_parser("eval", help="pass@k on miniF2F, ProofNet, MATH-500 or GSM8K")
    evaluate.add_argument("benchmark", help="minif2f | proofnet | math500 | gsm8k")
    evaluate.add_argument("--model", required=True, help="Hugging Face folder or hub id")
    evaluate.add_argument(
        "--data", help="a .jsonl/.json/.parquet file or dataset id (default: the shared data folder)"
    )
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--n", type=_number(int, 1), default=32, help="samples per problem")
    evaluate.add_argument("--k", default="1,8,32", help="comma-separated k for pass@k")
    evaluate.add_argument("--limit", type=_number(int, 1), help="first N problems only")
    evaluate.add_argument("--temperature", type=_number(float, 0), default=1.0)
    evaluate.add_argument("--top-p", type=_number(float, 0, above=True, high=1), default=0.95)
    evaluate.add_argument("--max-tokens", type=_number(int, 1), default=2048)
    evaluate.add_argument(
        "--stop", action="append", metavar="TEXT", help="end a completion at this string; repeatable"
    )
    evaluate.add_argument("--prompt", default="noncot", help="noncot | cot (Lean benchmarks)")
    evaluate.add_argument(
        "--chat", action="store_true", help="each prompt as the user's turn of the model's chat template"
    )
    evaluate.add_argument("--system-prompt", help="with --chat: a system turn before the user's")
    evaluate.add_argument("--out", help="output folder (default runs/eval-BENCHMARK); re-running resumes")
    evaluate.add_argument(
        "--dry-run", action="store_true", help="Lean: write the files to check, verify nothing"
    )
    evaluate.add_argument("--engines", type=_number(int, 1), default=1)
    evaluate.add_argument(
        "--engine-kwarg",
        dest="engine_kwargs",
        action="append",
        metavar="KEY=VALUE",
        help="a keyword argument for vllm.LLM (e.g. dtype=bfloat16, max_model_len=4096); repeatable",
    )
    evaluate.add_argument("--ray-address", default=None)

    export = commands.add_parser("export-fp8", help="write a checkpoint in DeepSeek-V3's FP8 format")
    export.add_argument("src", help="Hugging Face checkpoint folder")
    export.add_argument("dst", help="output folder")
    export.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PART",
        help="keep in BF16 the linear weights this names (whole dotted name components, as "
        "model.fp8_exclude names them, e.g. self_attn); repeatable",
    )
    export.add_argument(
        "--recipe",
        help="also keep in BF16 what this recipe's model.fp8_exclude names (a run's config.yaml works)",
    )

    report = commands.add_parser("report", help="plot a run's curves")
    report.add_argument("run_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's parser, whose -h lists what it takes, not grpo's
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from grpo.errors import ParityError

    try:
        return _dispatch(args)
    except ValueError as error:  # RecipeError and every other user-facing ValueError
        print(f"grpo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ParityError as error:  # the run stopped itself: broken weight sync, not a user error
        print(f"grpo {args.command}: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the engines, trainer and reward workers are shut down on the way
        print(f"grpo {args.command}: interrupted{INTERRUPTED_HINTS.get(args.command, '')}", file=sys.stderr)
        return 130


INTERRUPTED_HINTS = {
    "train": "; `grpo train RECIPE --resume` continues from the run's latest checkpoint",
    "eval": "; the same command continues: finished problems are kept",
}


def _dispatch(args) -> int:
    import json
    from pathlib import Path

    if args.command == "train":
        from grpo.config import load_recipe
        from grpo.orchestrator import before_after_table, train

        recipe = load_recipe(args.recipe, args.overrides)
        summary = train(recipe, ray_address=args.ray_address, resume=args.resume)
        print(before_after_table(summary))
    elif args.command == "sft":
        from grpo.config import load_recipe
        from grpo.sft import sft

        summary = sft(load_recipe(args.recipe, args.overrides))
        print(f"sft: loss {summary['final_loss']:.4f}; checkpoint {summary['checkpoint']}")
    elif args.command == "reward":
        from grpo.rewards.offline import score_file

        score_file(args.name, Path(args.input), args.output, args.workers, args.timeout)
    elif args.command == "eval":
        from grpo.eval.run import EvalArgs, engine_kwargs, evaluate_benchmark

        try:
            ks = tuple(int(k) for k in args.k.split(","))
        except ValueError:
            raise ValueError(f"--k {args.k!r}: expected comma-separated integers such as 1,8,32") from None
        options = {key: value for key, value in vars(args).items() if key not in ("command", "k")}
        options["stop"] = args.stop or []  # argparse's append leaves None when the option is not given
        options["engine_kwargs"] = engine_kwargs(args.engine_kwargs or [])
        report = evaluate_benchmark(EvalArgs(**options, k=ks))
        print(
            json.dumps({key: report[key] for key in report if key.startswith("pass@") or key == "problems"})
        )
    elif args.command == "export-fp8":
        from grpo.config import load_recipe
        from grpo.models.fp8_export import export_fp8

        recipe_keeps = load_recipe(args.recipe).model.fp8_exclude if args.recipe else []
        counts = export_fp8(args.src, args.dst, [*args.keep, *recipe_keeps])
        print(f"export-fp8: {counts['fp8']} FP8 weights, {counts['bf16']} BF16 tensors -> {args.dst}")
    elif args.command == "report":
        from grpo.metrics import plot_run

        print(plot_run(Path(args.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
