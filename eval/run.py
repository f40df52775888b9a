"""`grpo eval BENCHMARK --model PATH ...`: sample n completions per problem with the vLLM engines,
score them (math reward or Lean verifier), and report unbiased pass@k.

Outputs in `--out`: `problems.jsonl` (one line per finished problem: completions, verdicts, pass@k),
`report.json`, `report.md` and `settings.json`. A problem is written only once it is fully sampled and
verified, so re-running into the same folder with the same settings resumes: finished problems are
neither sampled nor verified again.
With `--dry-run` (Lean benchmarks) nothing is verified; the exact Lean files that would be checked
are written under `lean/` instead.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml
from grpo.eval.benchmarks import BENCHMARKS, Benchmark, default_data_dir
from grpo.eval.passk import pass_at_k

from grpo.config import changed_settings

CHUNK = 16  # problems sampled and verified together, then appended to problems.jsonl


@dataclass
class EvalArgs:
    benchmark: str
    model: str
    data: str | None = None
    split: str = "test"
    n: int = 32
    k: tuple[int, ...] = (1, 8, 32)
    limit: int | None = None
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 2048
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (vLLM's `stop`)."""
    prompt: str = "noncot"
    chat: bool = False
    system_prompt: str | None = None
    out: str | None = None
    dry_run: bool = False
    engines: int = 1
    engine_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for `vllm.LLM` (`--engine-kwarg KEY=VALUE`), as a recipe's
    `rollout.engine_kwargs`."""
    seed: int = 0
    ray_address: str | None = None
    timeout_s: float = 60.0
    reward_workers: int = 2


def load_rows(benchmark: Benchmark, data: str | None, split: str) -> list[dict]:
    from grpo.data import load_rows as load

    source = data or str(default_data_dir() / benchmark.default_file)
    if data is None and not Path(source).is_file():
        raise ValueError(f"no data for {benchmark.name}: pass --data PATH_OR_ID (looked for {source})")
    rows = load(source, split, "--split")
    if not rows:
        raise ValueError(f"no {split!r} rows in {source}")
    for number, row in enumerate(rows, 1):  # before any engine starts: a file of another benchmark
        if field := benchmark.missing_field(row):
            raise ValueError(f"{source}: row {number} has no {field} field, which {benchmark.name} rows need")
    return rows


def problem_id(benchmark: Benchmark, row: dict, index: int) -> str:
    return str(row.get(benchmark.id_field) or index) if benchmark.id_field else str(index)


def finished_problems(path: Path) -> list[dict]:
    """The records of `problems.jsonl`. A last line cut short, by a run stopped while it wrote, is
    removed from the file, so that its problem is sampled again and appends stay whole lines; a bad
    line elsewhere is an error, since resuming past it would mix its problem's state into the report."""
    # only "\n" ends a line (see grpo.jsonl); the piece after the last one is a cut-short line, even
    # where it parses, since the next record appended would continue it
    *lines, cut_short = path.read_text().split("\n") if path.exists() else [""]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}:{number}: not a problem's record; move the file away to start over")
        records.append(record)
    if cut_short:
        path.write_text("".join(line + "\n" for line in lines))
    return records


NOT_SETTINGS = ("k", "limit", "out", "engines", "ray_address", "reward_workers")
"""The `EvalArgs` that change no problem's samples or verdicts. Every other one is a setting, which
resuming into a folder needs the same (a new option is one unless it is listed here; a folder
written before it existed counts as sampled with its default)."""


DEFAULT_SETTINGS = {
    f.name: f.default_factory() if f.default_factory is not MISSING else f.default
    for f in fields(EvalArgs)
    if f.name not in NOT_SETTINGS and (f.default is not MISSING or f.default_factory is not MISSING)
}


def settings(args: EvalArgs) -> dict:
    """`args`' settings, a local model or data path resolved (so `./m` and `m` resume alike)."""
    found = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in NOT_SETTINGS}
    for key in ("model", "data"):
        if found[key] is not None and Path(found[key]).exists():
            found[key] = str(Path(found[key]).resolve())
    return found


def check_resumable(out: Path, now: dict) -> None:
    """A ValueError where `out` holds problems sampled under other settings: resuming would report
    them, another model's say, as this evaluation's. A folder whose run stopped before its first
    problem was written (an engine that did not start, say) holds none, and is taken as it is."""
    path, problems = out / "settings.json", out / "problems.jsonl"
    if not problems.is_file() or not problems.stat().st_size:
        return
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except json.JSONDecodeError:
            earlier = {}  # the model and benchmark, which have no default, then read as different
        if isinstance(earlier, dict):  # an option added since takes its default, as those samples did
            earlier = {**DEFAULT_SETTINGS, **earlier}
        if differ := changed_settings(earlier, now):
            raise ValueError(
                f"--out {out}: holds problems sampled with other settings ({'; '.join(differ)}); give "
                "another --out, or move it away to start over"
            )
    else:
        raise ValueError(
            f"--out {out}: holds a problems.jsonl without the settings.json that says how it was "
            "sampled; give another --out, or move it away to start over"
        )


def engine_kwargs(items: list[str]) -> dict:
    """`["max_model_len=4096", "dtype=bfloat16"]` as a dict, each value read as YAML (4096 an int)."""
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-kwarg {item!r}: expected KEY=VALUE, e.g. max_model_len=4096")
        try:
            parsed[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ValueError(
                f"--engine-kwarg {item!r}: not a YAML value ({str(error).splitlines()[0]})"
            ) from None
    return parsed


def check_args(args: EvalArgs, benchmark: Benchmark) -> None:
    from grpo.rollout.vllm_engine import check_engine_kwargs

    check_engine_kwargs(args.engine_kwargs, "--engine-kwarg ")
    if args.system_prompt is not None and not args.chat:
        raise ValueError("--system-prompt: only applies with --chat")
    if bad := [k for k in args.k if k > args.n or k < 1]:
        raise ValueError(f"--k {bad}: each k must be between 1 and --n ({args.n})")
    if args.temperature == 0 and args.n > 1:  # greedy decoding repeats one completion n times
        raise ValueError(
            f"--n {args.n} at --temperature 0 samples one greedy completion {args.n} times, so pass@k "
            "would equal pass@1; give --temperature above 0, or --n 1 --k 1"
        )
    if "" in args.stop:
        raise ValueError("--stop: an empty string would end every completion before its first token")
    if args.prompt not in ("noncot", "cot"):
        raise ValueError(f"--prompt {args.prompt!r}: use noncot or cot")
    if args.dry_run and benchmark.kind != "lean":
        raise ValueError(
            f"--dry-run: {benchmark.name} has no Lean files to write (minif2f and proofnet have)"
        )
    if benchmark.kind == "lean" and not args.dry_run:
        from grpo.rewards.lean import setup_problem

        if problem := setup_problem():
            raise ValueError(f"{problem}; or pass --dry-run to write the Lean files without checking them")


def write_lean_files(folder: Path, pid: str, row: dict, sample: dict, completions: list[str]) -> list[str]:
    """The exact files the verifier would check (header + code + `#print axioms`)."""
    from grpo.rewards.lean_checks import assemble, static_verdict, theorem_name

    folder.mkdir(parents=True, exist_ok=True)
    verdicts = []
    for i, completion in enumerate(completions):
        code = assemble(completion, sample["formal_statement"])
        rejected = static_verdict(code, sample["formal_statement"])
        if rejected is None:
            text = f"{sample['header']}{code}\n\n#print axioms {theorem_name(sample['formal_statement'])}\n"
            (folder / f"{pid.replace('/', '_')}_{i}.lean").write_text(text)
        verdicts.append("dry_run" if rejected is None else rejected.reason)
    return verdicts


def evaluate_benchmark(args: EvalArgs) -> dict:
    import ray
    from grpo.rewards.runtime import RewardEntry, RewardRuntime

    from grpo.config import output_folder
    from grpo.data import prompt_renderer
    from grpo.models.build import (
        check_max_model_len,
        context_length,
        load_tokenizer,
        materialize,
        model_config,
    )
    from grpo.rollout.engines import rollout, start_engines, start_ray
    from grpo.rollout.vllm_engine import SamplingSpec

    if args.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {args.benchmark!r}: use one of {sorted(BENCHMARKS)}")
    benchmark = BENCHMARKS[args.benchmark]
    check_args(args, benchmark)
    config = model_config(args.model, key="--model")  # read, nothing written: bad input leaves no folder
    check_max_model_len(config, args.engine_kwargs, "--engine-kwarg max_model_len")
    rows = load_rows(benchmark, args.data, args.split)[: args.limit]
    tokenizer = load_tokenizer(args.model)
    render = prompt_renderer(args.chat, args.system_prompt, tokenizer, "--chat")
    out, now = Path(args.out or f"runs/eval-{benchmark.name}"), settings(args)
    check_resumable(out, now)
    output_folder(out, "--out")
    (out / "settings.json").write_text(json.dumps(now, indent=2) + "\n")
    results_path = out / "problems.jsonl"
    done = {record["id"] for record in finished_problems(results_path)}
    problems = [(problem_id(benchmark, r, i), r) for i, r in enumerate(rows)]
    todo = [(pid, r) for pid, r in problems if pid not in done]
    model_path = materialize(args.model, out / "model", key="--model")
    spec = SamplingSpec(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    started, sampled = time.perf_counter(), 0
    if todo:
        reward = "lean" if benchmark.kind == "lean" else "math"
        start_ray(args.ray_address, args.engines)
        try:
            engines = start_engines(model_path, "float32", args.seed, args.engines, 1.0, args.engine_kwargs)
            runtime = (
                None
                if args.dry_run
                else RewardRuntime([RewardEntry(reward, reward)], args.reward_workers, args.timeout_s)
            )
            context = context_length(config, args.engine_kwargs)
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start : start + CHUNK]
                prompts = [tokenizer(render(benchmark.prompt(r, args.prompt)))["input_ids"] for _, r in chunk]
                # a prompt the model cannot even read gets no completions (and counts as unsolved)
                fits = [len(p) < context for p in prompts]
                sampled_groups = iter(rollout(engines, [p for p, ok in zip(prompts, fits) if ok], spec))
                groups = [next(sampled_groups) if ok else [] for ok in fits]
                sampled += len(chunk)
                with results_path.open("a") as handle:
                    for (pid, row), group in zip(chunk, groups):
                        texts, sample = [c.text for c in group], benchmark.sample(row)
                        if not texts:
                            verdicts, seconds, correct = ["prompt_too_long"] * args.n, [], 0
                        elif runtime is None:
                            verdicts, seconds = write_lean_files(out / "lean", pid, row, sample, texts), []
                            correct = 0
                        else:
                            scored = runtime.score(texts, [sample] * len(texts))
                            parts = [s.components[reward] for s in scored]
                            verdicts = [p.message or p.status for p in parts]
                            seconds = [p.seconds for p in parts]
                            correct = sum(p.status == "ok" for p in parts)
                        record = {
                            "id": pid,
                            "n": args.n,
                            "correct": correct,
                            **{f"pass@{k}": pass_at_k(args.n, correct, k) for k in args.k},
                            "completions": texts,
                            "verdicts": verdicts,
                            "verify_seconds": seconds,
                        }
                        handle.write(json.dumps(record) + "\n")
            if runtime is not None:
                runtime.close()
        finally:
            ray.shutdown()
    ids = {pid for pid, _ in problems}
    report = build_report(benchmark, args, results_path, ids, sampled, time.perf_counter() - started)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def build_report(
    benchmark: Benchmark, args: EvalArgs, results_path: Path, ids: set[str], sampled: int, seconds: float
) -> dict:
    """The report over the problems `ids` (this run's `--limit` of them), pass@k computed afresh for
    this run's `--k` from each problem's n and correct count."""
    records = [record for record in finished_problems(results_path) if record["id"] in ids]
    times = [t for r in records for t in r["verify_seconds"]]
    reasons = Counter(verdict.split(": ")[0] for r in records for verdict in r["verdicts"])
    return {
        "benchmark": benchmark.name,
        "model": args.model,
        "split": args.split,
        "problems": len(records),
        "samples_per_problem": args.n,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "prompt": args.prompt,
        "dry_run": args.dry_run,
        **{
            f"pass@{k}": statistics.fmean(pass_at_k(r["n"], r["correct"], k) for r in records)
            if records
            else None
            for k in args.k
        },
        "verification": {
            "seconds_mean": statistics.fmean(times) if times else None,
            "seconds_p50": statistics.median(times) if times else None,
            "timeouts": reasons.get("timeout", 0),
            "verdicts": dict(reasons.most_common()),
        },
        "problems_sampled_this_run": sampled,
        "wall_time_s": seconds,
        "published": benchmark.published,
    }


def markdown(report: dict) -> str:
    ks = [key for key in report if key.startswith("pass@")]
    head = "| benchmark | split | problems | n | prompt | " + " | ".join(ks) + " |"
    rule = "|" + "---|" * (5 + len(ks))
    cells = " | ".join("dry run" if report["dry_run"] else f"{100 * report[k]:.1f}%" for k in ks)
    row = f"| {report['benchmark']} | {report['split']} | {report['problems']} | {report['samples_per_problem']} | {report['prompt']} | {cells} |"
    return (
        f"# {report['model']}\n\n{head}\n{rule}\n{row}\n\nPublished, for comparison: {report['published']}\n"
    )
