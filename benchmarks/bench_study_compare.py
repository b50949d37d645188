"""What one more model costs the method study's `compare`: all pairs against the anchors.

A study of N models (the initial model and N - 1 rows, ``--models`` from 13 to 16 by
default) is judged on the study's held-out prompt counts (``--red-team`` 44, ``--helpful``
30). For each N, the evaluate stage's own pairwise step (``rate_models``: ``pairwise`` on
both dimensions, both orders, then the Elo fit) runs on N and on N + 1 models, with every
model's answers distinct synthetic text, under two designs:

* ``all pairs``: ``evaluate.anchors=all``, what `compare` did before;
* ``anchors``: the initial model and the preset's row (``dpo-sl``), what `compare` passes now.

The judge is a fake that counts the questions it is asked and answers each at once, so
the questions a model adds are counted, not computed from a formula; the seconds are
cai's own work per question (building the questions, the records, the fit), without any
model: the best of ``--repeats`` runs of the N + 1-model step. A real judge's time is
about proportional to its questions (the 135M judge: 30 minutes for three rows added to
thirteen, all pairs). Writes ``benchmarks/results/study_compare.json``.

    python benchmarks/bench_study_compare.py [--models 13 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cai.constitution import ComparisonPrinciple  # noqa: E402
from cai.prompts import Prompt  # noqa: E402
from cai.stages.evaluate import rate_models  # noqa: E402

from _common import log, machine_info, starved_warning, timed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ANCHORS = ["initial", "dpo-sl"]
LOGPROBS = [math.log(0.6), math.log(0.4)]


class CountingJudge:
    """Answers every comparison "(A)" at 0.6 and counts the questions."""

    def __init__(self):
        self.questions = 0

    def choice_logprobs(self, conversations, options, progress=None, on_result=None):
        self.questions += len(conversations)
        return [list(LOGPROBS) for _ in conversations]


@contextlib.contextmanager
def _progress(total, desc, unit="req"):
    yield lambda n: None


def study(n: int, red: int, helpful: int):
    """N model names (initial, dpo-sl, then rows), prompts and distinct answers of ~60 words."""
    names = ANCHORS + [f"row-{k:02d}" for k in range(n - len(ANCHORS))]
    prompts = {s: [Prompt(id=f"{s}-{k}", messages=[{"role": "user", "content": f"{s} question {k}: " + "why " * 20}])
                   for k in range(count)] for s, count in (("red_team", red), ("helpful", helpful))}
    answers = {s: {m: [f"{m} answers {p.id}: " + "words " * 60 for p in ps] for m in names} for s, ps in prompts.items()}
    return names, prompts, answers


def judge_pass(names, prompts, answers, anchors):
    """The evaluate stage's pairwise step on ``names``: returns the judge's questions."""
    principles = {"harmlessness": ComparisonPrinciple("less-harmful", "Which response is less harmful?"),
                  "helpfulness": ComparisonPrinciple("more-helpful", "Which response is more helpful?")}
    judge = CountingJudge()
    rate_models(judge, names, answers, prompts, principles, [], 0, 0, _progress, anchors)
    return judge.questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, nargs=2, default=[13, 16], metavar=("FROM", "TO"))
    ap.add_argument("--red-team", type=int, default=44)
    ap.add_argument("--helpful", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    rows, busy = [], []
    for n in range(args.models[0], args.models[1] + 1):
        names, prompts, answers = study(n + 1, args.red_team, args.helpful)
        row = {"models": n}
        for design, anchors in (("all pairs", None), ("anchors", ANCHORS)):
            before = judge_pass(names[:-1], prompts, answers, anchors)
            runs = [timed(lambda: judge_pass(names, prompts, answers, anchors)) for _ in range(args.repeats)]
            after, seconds, cores = min(runs, key=lambda r: r[1])
            busy.append((f"{design} {n + 1}", cores))
            row[design] = {"questions": before, "questions_with_one_more": after, "added_questions": after - before,
                           "seconds_with_one_more": round(seconds, 3)}
            log(f"{n} models, {design}: {before} questions, one more adds {after - before} ({seconds:.2f} s)")
        row["added_ratio"] = round(row["all pairs"]["added_questions"] / row["anchors"]["added_questions"], 2)
        row["seconds_ratio"] = round(row["all pairs"]["seconds_with_one_more"] / row["anchors"]["seconds_with_one_more"], 2)
        rows.append(row)

    print("| models N | all pairs: questions | anchors: questions | one more model adds: all pairs | anchors "
          "| ratio | N + 1 models, cai's seconds: all pairs | anchors | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["all pairs"], r["anchors"]
        print(f"| {r['models']} | {a['questions']} | {b['questions']} | {a['added_questions']} | {b['added_questions']} "
              f"| {r['added_ratio']:.1f}x | {a['seconds_with_one_more']:.2f} | {b['seconds_with_one_more']:.2f} "
              f"| {r['seconds_ratio']:.1f}x |")
    per_prompt_pair = 2 * (args.red_team + args.helpful)
    print(f"adding one model to N: all pairs adds N x {per_prompt_pair} questions, the anchors "
          f"{len(ANCHORS)} x {per_prompt_pair} whatever N")
    three = None
    if len(rows) >= 3:  # the rows added one after another, as in the 30-minute compare
        three = {d: sum(r[d]["added_questions"] for r in rows[:3]) for d in ("all pairs", "anchors")}
        print(f"three rows added to {rows[0]['models']}: {three['all pairs']} questions against {three['anchors']} "
              f"({three['all pairs'] / three['anchors']:.1f}x)")
    warn = starved_warning(1, busy)  # plain Python: one core is all it can keep busy
    if warn:
        print(warn)
    out = RESULTS / "study_compare.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "settings": {**vars(args), "anchors": ANCHORS}, "machine": {**machine_info(), "loadavg": os.getloadavg()},
        "results": rows, "three_added": three,
        "cores_busy": dict(busy), "when": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
