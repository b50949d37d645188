"""AI-feedback labelling: option log-probabilities vs generating the answer and parsing it.

Both modes label the same comparisons with the same engine (the embedded default
SmolLM2-135M-Instruct, ``LocalEngine`` with the cpu-tiny preset's settings) and the same
questions (the feedback stage's own ``question``/``demo_turns``, the default
constitution's comparison demonstrations, both orders):

* ``logprobs``: what the feedback stage does. The assistant turn is opened with
  ``The answer is: (`` and ``choice_logprobs`` reads the normalised probability of
  ``A`` and ``B`` in one forward pass per question.
* ``generate``: the usual LLM-as-judge recipe. The model answers the question with
  greedy decoding (``--budget`` new tokens, stopping at end of turn), and the first
  "(A)"/"(B)" in its text is taken as the label (a hard label; text without one is a
  parse failure).

The answers being compared are sampled first (``--prompts`` red-team train prompts, 2
answers each at temperature 1) and are not timed. Prints a table and writes
``benchmarks/results/feedback.json`` (``feedback_fewshot0.json`` with ``--few-shot 0``).

    HF_HUB_OFFLINE=1 python benchmarks/bench_feedback.py [--prompts 16] [--budget 48] [--few-shot 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cai.constitution import load_constitution  # noqa: E402
from cai.engines.base import SamplingParams  # noqa: E402
from cai.engines.local import LocalEngine  # noqa: E402
from cai.models import resolve_model  # noqa: E402
from cai.prompts import load_prompt_set  # noqa: E402
from cai import conversations as conv  # noqa: E402
from cai.stages import feedback as fb  # noqa: E402

from _common import log, machine_info, starved_warning, timed, usable_cores  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_PARSE = re.compile(r"\(\s*([AB])\s*\)|answer is:?\s*\(?([AB])\b")


def parse(text: str) -> str | None:
    m = _PARSE.search(text)
    return (m.group(1) or m.group(2)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--budget", type=int, default=48, help="new-token budget of the generate mode")
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--quantize", default="int8", choices=("none", "int8"))
    ap.add_argument("--few-shot", type=int, default=-1,
                    help="comparison demonstrations in both modes (-1: all 3; 0: none, so the generate mode "
                         "writes free text instead of copying the demonstrations' short answers)")
    args = ap.parse_args()

    engine = LocalEngine(resolve_model("default"), device="cpu", quantize=args.quantize, batch_size=32)
    const = load_constitution("builtin:default")
    prompts = load_prompt_set("builtin:red_team")["train"][: args.prompts]
    log(f"sampling 2 answers for {len(prompts)} prompts (not timed)")
    answers = engine.generate([p.messages for p in prompts],
                              SamplingParams(n=2, temperature=1.0, max_new_tokens=args.answer_tokens, seed=1))
    comparisons = []
    for p, outs in zip(prompts, answers):
        comparisons += fb.make_pairs("train", "harmlessness", p, outs, const.comparison_principles, 1, 0)
    comparisons = [c for c in comparisons if c.status == "labelled"]
    fb.build_queries(comparisons, both_orders=True)
    questions = [q["question"] for c in comparisons for q in c.queries]
    texts = {p.id: p.text for p in const.comparison_principles}
    examples = const.comparison_examples if args.few_shot < 0 else const.comparison_examples[: args.few_shot]
    demos = conv.comparison_demos(examples, texts, cot=False)
    scored = [demos + [{"role": "user", "content": q}, {"role": "assistant", "content": conv.ANSWER_PREFIX}]
              for q in questions]
    asked = [demos + [{"role": "user", "content": q}] for q in questions]
    engine.choice_logprobs(scored[:1], [conv.OPTIONS])  # warm-up
    engine.generate(asked[:1], SamplingParams(max_new_tokens=2))

    cores = usable_cores()
    log(f"logprobs: {len(scored)} questions ({len(comparisons)} comparisons, both orders)")
    lps, t_lp, busy_lp = timed(lambda: engine.choice_logprobs(scored, [conv.OPTIONS] * len(scored)))
    log(f"generate: the same {len(asked)} questions, budget {args.budget} new tokens")
    outs, t_gen, busy_gen = timed(lambda: engine.generate(asked, SamplingParams(max_new_tokens=args.budget)))
    parsed = [parse(o[0]) for o in outs]
    by_lp = ["A" if lp[0] >= lp[1] else "B" for lp in lps]
    agree = [a == b for a, b in zip(parsed, by_lp) if a]
    new_tokens = sum(len(engine.encode(o[0])) for o in outs)
    rate_lp, rate_gen = len(comparisons) / t_lp, len(comparisons) / t_gen
    summary = {
        "comparisons": len(comparisons),
        "questions": len(questions),
        "logprobs_seconds": round(t_lp, 2),
        "generate_seconds": round(t_gen, 2),
        "logprobs_comparisons_per_s": round(rate_lp, 3),
        "generate_comparisons_per_s": round(rate_gen, 3),
        "speedup": round(rate_lp / rate_gen, 2),
        "generate_mean_new_tokens": round(new_tokens / len(outs), 1),
        "generate_parse_rate": round(sum(x is not None for x in parsed) / len(parsed), 3),
        "generate_agrees_with_logprob_argmax": round(sum(agree) / len(agree), 3) if agree else None,
        "cores_busy": {"logprobs": round(busy_lp, 2), "generate": round(busy_gen, 2)},
    }
    print("| mode | seconds | comparisons/s |")
    print("|---|---:|---:|")
    print(f"| logprobs (both orders) | {t_lp:.1f} | {rate_lp:.2f} |")
    print(f"| generate + parse, budget {args.budget} | {t_gen:.1f} | {rate_gen:.2f} |")
    print(f"logprobs / generate: {summary['speedup']:.1f}x more comparisons per second; "
          f"generate wrote {summary['generate_mean_new_tokens']} tokens on average, parsed "
          f"{summary['generate_parse_rate']:.0%} of its answers")
    warn = starved_warning(cores, [("logprobs", busy_lp), ("generate", busy_gen)])
    if warn:
        print(warn)
    out = RESULTS / ("feedback.json" if args.few_shot < 0 else f"feedback_fewshot{args.few_shot}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "settings": vars(args), "machine": {**machine_info(), "loadavg": os.getloadavg()},
        "summary": summary, "sample_generations": [o[0] for o in outs[:6]], "when": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
