"""SL-CAI critique/revision throughput of the embedded default model (SmolLM2-135M-Instruct).

Compares, in one run on one machine, two ways to do the same critique_revision work:

* ``naive``: the paper's pseudocode loop. Red-team prompts one at a time: answer,
  then per round critique and revise, each a separate ``engine.generate`` call with
  one conversation on ``LocalEngine(batch_size=1)``. The conversations, principles,
  token budgets and seeds come from the stage's own helpers
  (``demo_turns``, ``critique_conversation``, ``revision_conversation``,
  ``sample_principle``, ``clean``) and the default constitution's demonstrations.
* ``cai``: the real stage, ``cai.stages.critique_revision.run``, on a prepared run
  directory and ``LocalEngine(batch_size=B)`` without a request cache: round by round
  across all prompts, one engine call for all first answers, then per round one for
  all critiques and one for all revisions, sharing the few-shot prefix in a batch.

Both process the first N red-team prompts of each split (train and test, so 2N
prompts) with ``helpful_ratio=0`` and ``skip_if_no_issue=false``. Like the stage, the
naive loop does not revise after an empty critique, so both send the same requests
unless sampling makes a critique empty on one side only. Each mode is warmed up with
one tiny call before it is timed. Prints a markdown table and writes JSON to
``benchmarks/results/critique_revision.json``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_critique_revision.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from cai.config import RunConfig, load_config
from cai.constitution import load_constitution
from cai.engines.base import Conversation, Engine, SamplingParams
from cai.engines.local import LocalEngine
from cai.models import resolve_model
from cai.pipeline import run_pipeline
from cai.stage import StageContext
from cai.prompts import load_prompt_file
from cai.stages import critique_revision as stage
from cai.conversations import (
    clean,
    critique_conversation,
    revision_conversation,
    revision_demos,
    revision_sampling,
    sample_principle,
)
from cai.prompts import SPLITS

from _common import log, starved_warning, timed, usable_cores, write_report

CONSTITUTION = "builtin:default"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "critique_revision.json"
# (prompts per split, rounds, max_new_tokens, critique_max_new_tokens)
FULL = (8, 1, 64, 48)
QUICK = (2, 1, 16, 16)


class CountingEngine(Engine):
    """Passes calls to a LocalEngine and records every request and its raw outputs."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine
        self.identity = engine.identity
        self.calls = 0
        self.outputs: list[str] = []

    def generate(self, conversations, params, progress=None, on_result=None):
        self.calls += 1
        result = self.engine.generate(conversations, params, progress=progress, on_result=on_result)
        self.outputs += [samples[0] for samples in result]
        return result

    def choice_logprobs(self, conversations, options, progress=None, on_result=None):
        raise NotImplementedError("critique_revision only generates")

    @property
    def requests(self) -> int:
        return len(self.outputs)


class QuietContext(StageContext):
    """The stage's context without tqdm bars (the naive loop draws none either)."""

    @contextlib.contextmanager
    def progress(self, total: int, desc: str, unit: str = "req"):
        yield lambda n: None


@dataclass
class Result:
    mode: str
    batch: int
    prompts: int
    engine_calls: int
    requests: int
    new_tokens: int
    seconds: float
    cpu_cores_used: float  # process CPU time / wall time while timed: drops when others compete

    @property
    def prompts_per_s(self) -> float:
        return self.prompts / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    def to_dict(self) -> dict:
        return {
            **asdict(self), "prompts_per_s": self.prompts_per_s, "requests_per_s": self.requests_per_s,
            "new_tokens_per_s": self.tokens_per_s,
        }


def measure(mode: str, engine: LocalEngine, run: Callable[[CountingEngine], dict], warmup: Sequence[Conversation], prompts: int) -> tuple[Result, dict]:
    """Warm up with one tiny call, then time ``run`` once; returns the result and run's answers."""
    engine.generate(list(warmup[: engine.batch_size]), SamplingParams(temperature=0.7, max_new_tokens=2))
    counter = CountingEngine(engine)
    answers, seconds, cores_used = timed(lambda: run(counter))
    new_tokens = sum(len(engine.encode(text)) for text in counter.outputs)
    result = Result(mode, engine.batch_size, prompts, counter.calls, counter.requests, new_tokens, seconds, cores_used)
    log(
        f"  {mode:<5} batch {result.batch:>3}: {prompts:>3} prompts, {counter.calls:>3} engine calls, "
        f"{counter.requests:>4} requests in {seconds:7.1f} s, {result.prompts_per_s:6.3f} prompts/s, "
        f"{result.tokens_per_s:6.1f} tok/s, {cores_used:.2f} cores busy"
    )
    return result, answers


# -- the two modes --------------------------------------------------------------------


def prepare_run_dir(run_dir: Path, overrides: list[str]) -> RunConfig:
    """Run the prepare stage into ``run_dir``; return the config the stage will read."""
    base = [f"run_dir={run_dir}", *overrides]
    run_pipeline(load_config(None, base + ["stages=[prepare]"]), log=lambda msg: log(f"  {msg}"))
    return load_config(None, base + ["stages=[prepare, critique_revision]"])


def red_team_items(cfg: RunConfig) -> list:
    """The (split, prompt) pairs the stage processes, in its order."""
    folder = Path(cfg.run_dir) / "prepare" / "prompts" / "red_team"
    n = cfg.critique_revision.max_prompts
    return [(s, p) for s in SPLITS for p in load_prompt_file(folder / f"{s}.jsonl")[:n]]


def naive_runner(cfg: RunConfig) -> Callable[[CountingEngine], dict]:
    """The paper's loop: per prompt, answer, then per round critique and revise, one request per call."""
    cr = cfg.critique_revision
    assert cr.critique and not cr.skip_if_no_issue and cr.helpful_ratio == 0
    items = red_team_items(cfg)
    const = load_constitution(CONSTITUTION)


    def run(engine: CountingEngine) -> dict:
        examples = const.critique_revision_examples
        if cr.few_shot >= 0:
            examples = examples[: cr.few_shot]
        demos = revision_demos(examples, cr.critique)

        def one(conv, sp):
            return clean(engine.generate([conv], sp)[0][0])

        answers = {}
        for split, p in items:
            first = latest = one(p.messages, revision_sampling(cr, cfg.seed, "answer"))
            for r in range(cr.rounds):
                principle = sample_principle(const, cfg.seed, p.id, r)
                critique = one(critique_conversation(demos, p.messages, latest, principle),
                               revision_sampling(cr, cfg.seed, "critique", r))
                if not critique:  # the stage revises nothing after an empty critique
                    continue
                revision = one(revision_conversation(demos, p.messages, latest, principle, critique),
                               revision_sampling(cr, cfg.seed, "revision", r))
                if revision:  # the stage keeps the previous answer after an empty revision
                    latest = revision
            answers[(split, p.id)] = (first, latest)
        return answers

    return run


def cai_runner(cfg: RunConfig) -> Callable[[CountingEngine], dict]:
    """The critique_revision stage itself, on the prepared run directory."""
    run_dir = Path(cfg.run_dir)
    out = run_dir / "critique_revision.bench"

    def run(engine: CountingEngine) -> dict:
        out.mkdir(parents=True, exist_ok=True)
        ctx = QuietContext(cfg=cfg, run_dir=run_dir, out=out, name=stage.STAGE.name, log=log,
                           engines={cfg.engine.model: engine})
        stage.run(ctx)
        return {
            (s, c["id"]): (c["initial_response"], c["final_response"])
            for s in SPLITS
            for c in map(json.loads, (out / "chains" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines())
        }

    return run


def check_constitution(cfg: RunConfig) -> None:
    """The stage reads the run's frozen copy, the naive loop the builtin: they must agree."""
    frozen = load_constitution(Path(cfg.run_dir) / "prepare" / "constitution.yaml")
    builtin = load_constitution(CONSTITUTION)
    if (frozen.principles, frozen.critique_revision_examples) != (builtin.principles, builtin.critique_revision_examples):
        raise SystemExit(f"the prepared constitution differs from {CONSTITUTION}; set data.constitution to it")


# -- reporting ------------------------------------------------------------------------


def markdown_table(results: list[Result], base: Result) -> str:
    lines = [
        "| mode | batch | prompts | requests | seconds | prompts/s | ratio vs naive | new tokens | cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.batch} | {r.prompts} | {r.requests} | {r.seconds:.1f} | {r.prompts_per_s:.3f} "
            f"| {r.prompts_per_s / base.prompts_per_s:.2f}x | {r.new_tokens} | {r.cpu_cores_used:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"N={QUICK[0]}, rounds={QUICK[1]}, max_new_tokens={QUICK[2]}, "
                         f"critique_max_new_tokens={QUICK[3]} (a couple of minutes)")
    ap.add_argument("--prompts", type=int, help=f"red-team prompts per split, train and test (default {FULL[0]})")
    ap.add_argument("--rounds", type=int, help=f"critique/revision rounds (default {FULL[1]})")
    ap.add_argument("--max-new-tokens", type=int, help=f"budget of answers and revisions (default {FULL[2]})")
    ap.add_argument("--critique-max-new-tokens", type=int, help=f"budget of critiques (default {FULL[3]})")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32, help="LocalEngine batch size of the cai mode (default 32)")
    ap.add_argument("--run-dir", type=Path, help="keep the prepared run directory here (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    n, rounds, max_new, crit_new = (
        given if given is not None else default
        for given, default in zip(
            (args.prompts, args.rounds, args.max_new_tokens, args.critique_max_new_tokens),
            QUICK if args.quick else FULL,
        )
    )

    overrides = [
        f"seed={args.seed}",
        f"critique_revision.rounds={rounds}",
        f"critique_revision.max_prompts={n}",
        "critique_revision.helpful_ratio=0",
        "critique_revision.skip_if_no_issue=false",
        f"critique_revision.max_new_tokens={max_new}",
        f"critique_revision.critique_max_new_tokens={crit_new}",
        f"critique_revision.temperature={args.temperature}",
    ]
    cores = usable_cores()
    load_before = os.getloadavg()
    wall_start = time.perf_counter()

    with contextlib.ExitStack() as stack:
        run_dir = args.run_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cai-bench-cr-")))
        log(f"preparing {run_dir}:")
        cfg = prepare_run_dir(run_dir.resolve(), overrides)
        check_constitution(cfg)
        items = red_team_items(cfg)
        cr = cfg.critique_revision

        model_dir = resolve_model("default")
        naive_engine = LocalEngine(model_dir, batch_size=1)
        # Same weights, another batch size: load once.
        cai_engine = LocalEngine(model_dir, batch_size=args.batch_size, model=naive_engine.model, tokenizer=naive_engine.tok)
        const = load_constitution(CONSTITUTION)
        demos = revision_demos(const.critique_revision_examples, True)
        warmup = [critique_conversation(demos, p.messages, "I can't help with that.", const.principles[0]) for _, p in items]
        log(f"model {model_dir}; {len(items)} red-team prompts, {cr.rounds} round(s), max_new_tokens {cr.max_new_tokens}, "
            f"critique_max_new_tokens {cr.critique_max_new_tokens}, temperature {cr.temperature}, top_p {cr.top_p}")

        naive, naive_answers = measure("naive", naive_engine, naive_runner(cfg), warmup, len(items))
        cai, cai_answers = measure("cai", cai_engine, cai_runner(cfg), warmup, len(items))
    wall = time.perf_counter() - wall_start
    load_after = os.getloadavg()
    results = [naive, cai]

    same_first = sum(naive_answers.get(i, (None,))[0] == a[0] for i, a in cai_answers.items())
    same_final = sum(naive_answers.get(i, (None, None))[1] == a[1] for i, a in cai_answers.items())
    summary = {
        "cai_vs_naive_prompts_per_s": cai.prompts_per_s / naive.prompts_per_s,
        "cai_vs_naive_new_tokens_per_s": cai.tokens_per_s / naive.tokens_per_s,
        "same_requests": naive.requests == cai.requests,
        "identical_first_answers": same_first,
        "identical_final_answers": same_final,
    }

    print(f"\nSL-CAI critique_revision throughput, SmolLM2-135M-Instruct, {len(items)} red-team prompts "
          f"({n} per split), {cr.rounds} round(s), max_new_tokens {cr.max_new_tokens}, critique_max_new_tokens "
          f"{cr.critique_max_new_tokens}, temperature {cr.temperature}, top_p {cr.top_p}{' (quick)' if args.quick else ''}\n")
    print(markdown_table(results, naive))
    print()
    print(f"cai (batch {cai.batch}) / naive (batch 1) prompts/s: {summary['cai_vs_naive_prompts_per_s']:.2f}x "
          f"({summary['cai_vs_naive_new_tokens_per_s']:.2f}x new tok/s)")
    print(f"engine calls: naive {naive.engine_calls}, cai {cai.engine_calls}; requests: naive {naive.requests}, "
          f"cai {cai.requests}{'' if summary['same_requests'] else ' (DIFFERENT: a critique came back empty on one side)'}")
    print(f"identical answers across modes: {same_first}/{len(items)} first, {same_final}/{len(items)} final "
          "(batching changes float rounding, so sampled texts may drift apart)")
    print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; total wall time {wall:.0f} s")
    warning = starved_warning(cores, [(r.mode, r.cpu_cores_used) for r in results])
    if warning:
        print(warning)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(
        args.out,
        model={"name": "SmolLM2-135M-Instruct", "checkpoint": model_dir},
        settings={
            "quick": args.quick, "seed": cfg.seed, "prompts_per_split": n, "prompts": len(items),
            "rounds": cr.rounds, "max_new_tokens": cr.max_new_tokens,
            "critique_max_new_tokens": cr.critique_max_new_tokens, "temperature": cr.temperature,
            "top_p": cr.top_p, "few_shot": cr.few_shot, "helpful_ratio": cr.helpful_ratio,
            "skip_if_no_issue": cr.skip_if_no_issue, "cai_batch_size": cai.batch,
            "min_shared_prefix": cai_engine.min_shared_prefix, "constitution": CONSTITUTION,
            "prompt_set": "builtin:red_team (first N of train and of test)",
        },
        load_before=load_before, load_after=load_after, wall=wall, results=results, summary=summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
