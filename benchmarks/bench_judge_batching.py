"""The judge's option scoring: batches by length against batches of shared starts, one run.

evaluate asks its judge, for every prompt, about every pair of models' answers in both
orders, and about every model's answer alone (refusal, safety). Every question about one
prompt starts with the same tokens up to its first answer. The local engine runs a batch's
common start once (``LocalEngine._prefill``), so which questions share a batch decides
how many tokens the model reads. Before 2026-12-08 the scoring batches were the questions
sorted by length; now they are the questions in token order, closed where the next one
would share less than it costs (``_prefix_batches``).

This builds evaluate's pairwise questions on ``--prompts`` red-team and helpful prompts with
``--models`` sampled answers each (48 new tokens, the default run's budget), and scores
them with the embedded model on the int8 engine, both ways, interleaved (length, prefix,
prefix, length). It reports the tokens the model read (a count, not a time: the same on
every machine), the median seconds of each way, their ratio, and the largest difference
between the two ways' log-probs; with ``--alone`` also each way's distance from asking
every question alone.

    HF_HUB_OFFLINE=1 python benchmarks/bench_judge_batching.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "judge_batching.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12, help="prompts (half red-team, half helpful)")
    ap.add_argument("--models", type=int, default=4, help="answers per prompt (the models compared, all pairs)")
    ap.add_argument("--alone", action="store_true", help="also ask every question alone (batch 1) and report how far "
                    "each way's log-probs are from that (int8 scores move with their batch: docs/engine.md)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()

    import torch

    from cai.constitution import load_constitution
    from cai.conversations import OPTIONS, answer_turn, question
    from cai.engines import local
    from cai.engines.base import SamplingParams
    from cai.models import resolve_model
    from cai.prompts import load_prompt_set

    engine = local.LocalEngine(resolve_model("default"), quantize="int8")
    prompts = (load_prompt_set("builtin:red_team")["test"][: a.prompts // 2]
               + load_prompt_set("builtin:helpful")["test"][: a.prompts - a.prompts // 2])
    convs = [p.messages for p in prompts]
    answers = [engine.generate(convs, SamplingParams(max_new_tokens=48, temperature=1.0, seed=m)) for m in range(a.models)]
    principle = load_constitution("builtin:default").comparison_principles[0].text
    queries = []
    for k, p in enumerate(prompts):
        for i in range(a.models):
            for j in range(i + 1, a.models):
                for x, y in ((i, j), (j, i)):
                    queries.append([{"role": "user", "content": question(p.messages, principle, answers[x][k][0],
                                                                          answers[y][k][0])},
                                    {"role": "assistant", "content": answer_turn(None)}])

    read = {"tokens": 0, "calls": 0}
    forward = engine.model.forward

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        read["tokens"] += int(ids.numel())
        read["calls"] += 1
        return forward(*args, **kwargs)

    engine.model.forward = counting
    ways = {"length": local._length_batches, "prefix": local._prefix_batches}  # the CPU engine batches with the latter
    results = {w: {"seconds": [], "tokens": None, "calls": None, "logprobs": None} for w in ways}
    engine.choice_logprobs(queries[:2], [OPTIONS] * 2)  # warm-up
    busy = []
    for way in ("length", "prefix", "prefix", "length"):
        local._prefix_batches = ways[way]
        read.update(tokens=0, calls=0)
        lps, seconds, cores = _common.timed(lambda: engine.choice_logprobs(queries, [OPTIONS] * len(queries)))
        busy.append((way, cores))
        r = results[way]
        r["seconds"].append(round(seconds, 2))
        r["tokens"], r["calls"], r["logprobs"] = read["tokens"], read["calls"], lps
        _common.log(f"{way}: {seconds:.2f} s, {read['tokens']} tokens read in {read['calls']} calls")
    local._prefix_batches = ways["prefix"]
    question_tokens = sum(len(engine.encode(engine.render(q))) for q in queries)
    diff = max(abs(x - y) for a_, b_ in zip(results["length"]["logprobs"], results["prefix"]["logprobs"])
               for x, y in zip(a_, b_))
    med = {w: statistics.median(results[w]["seconds"]) for w in ways}
    summary = {
        "questions": len(queries),
        "question_tokens": question_tokens,
        "tokens_read": {w: results[w]["tokens"] for w in ways},
        "model_calls": {w: results[w]["calls"] for w in ways},
        "seconds": {w: results[w]["seconds"] for w in ways},
        "median_seconds": med,
        "length_over_prefix": round(med["length"] / med["prefix"], 2),
        "tokens_length_over_prefix": round(results["length"]["tokens"] / results["prefix"]["tokens"], 2),
        "largest_logprob_difference": diff,
        "score_batch_size": engine.score_batch_size,
    }
    if a.alone:
        alone = [engine.choice_logprobs([q], [OPTIONS])[0] for q in queries]
        for way in ways:
            diffs = sorted(abs(x - y) for got, ref in zip(results[way]["logprobs"], alone) for x, y in zip(got, ref))
            summary[f"{way}_vs_alone"] = {"mean": round(sum(diffs) / len(diffs), 5),
                                          "median": round(diffs[len(diffs) // 2], 5), "largest": round(diffs[-1], 5)}
    warning = _common.starved_warning(_common.usable_cores(), busy)
    report = {"what": __doc__.splitlines()[0], "settings": vars(a) | {"out": str(a.out)},
              "machine": _common.machine_info(), "summary": summary, "warning": warning,
              "torch_threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    if warning:
        print(warning)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
