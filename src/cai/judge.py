"""The AI-feedback judge, reusable outside a run: the feedback stage's own labelling.

A comparison is a prompt and two answers. The judge (any engine) reads a multiple-choice
question per sampled comparison principle, in both answer orders, with the constitution's
demonstrations, and the label is the normalised probability of ``A`` against ``B`` at a
fixed position (optionally after a chain of thought, then clamped to ``cot_clamp``). The
feedback stage labels its pairs with these functions; :class:`Judge` wraps them for a
caller's own pairs, and ``cai label`` for a file of pairs.

Python::

    from cai.judge import Judge
    judge = Judge.from_config(load_config("cpu-tiny"))
    v = judge.compare("How do I pick a lock?", "I can't help with that.", "First, insert a tension wrench...")
    v.p_a, v.position_consistent, v.questions   # p(a is better), both orders agree?, per-order detail

    # a TRL reward function (GRPOTrainer, RLOOTrainer): each completion's mean probability of
    # being judged better than the other completions of its prompt
    trainer = GRPOTrainer(model=..., reward_funcs=judge.reward_function(), ...)

Answers are hostile data: they are only ever placed inside the question, the label is read
at a fixed position after the fixed suffix, and the engines defang special-token strings.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field

from cai import seeds
from cai.constitution import ComparisonPrinciple, Constitution
from cai.conversations import (
    COT_CUE,
    OPTIONS,
    answer_turn,
    clean_reasoning,
    comparison_demos,
    is_abstention,
    principle_texts,
    question,
    softmax2,
)
from cai.engines.base import SamplingParams
from cai.errors import CaiError
from cai.prompts import Prompt

SOURCES = ("harmlessness", "helpfulness")


# -- comparisons (the feedback stage's) -------------------------------------------------


@dataclass
class Comparison:
    id: str
    split: str
    source: str  # harmlessness | helpfulness | human
    prompt: Prompt
    a: str
    b: str
    principles: list[ComparisonPrinciple] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    p_a: float | None = None  # label: probability that answer a is the better one
    p_a_raw: float | None = None  # before the chain-of-thought clamp
    status: str = "labelled"


def principle_pool(const: Constitution, source: str) -> list[ComparisonPrinciple]:
    """The principles a ``source`` pair is asked under: the comparison principles for
    harmlessness, the helpfulness principles for helpfulness."""
    return const.comparison_principles if source == "harmlessness" else const.helpfulness_principles


def sample_principles(seed: int, source: str, cid: str, pool, n: int) -> list[ComparisonPrinciple]:
    """The ``n`` principles of comparison ``cid``: the same for the same seed, source and id."""
    rng = random.Random(f"{seed}:feedback:{source}:{cid}")
    return [rng.choice(pool) for _ in range(n)]


def comparison(cid: str, split: str, source: str, prompt: Prompt, a: str, b: str, pool, n_principles: int,
               seed: int) -> Comparison:
    c = Comparison(cid, split, source, prompt, a, b, principles=sample_principles(seed, source, cid, pool, n_principles))
    if a.strip() == b.strip():
        c.status = "identical"
    return c


def make_pairs(split: str, source: str, prompt: Prompt, answers: list[str], pool, n_principles, seed) -> list[Comparison]:
    """Every pair of one prompt's answers as a comparison (``<prompt id>/<i>-<j>``)."""
    return [comparison(f"{prompt.id}/{i}-{j}", split, source, prompt, answers[i], answers[j], pool, n_principles, seed)
            for i, j in itertools.combinations(range(len(answers)), 2)]


def build_queries(comparisons: list[Comparison], both_orders: bool) -> None:
    for c in comparisons:
        if c.status != "labelled":
            continue
        for k, principle in enumerate(c.principles):
            for order in ("ab", "ba") if both_orders else ("ab",):
                first, second = (c.a, c.b) if order == "ab" else (c.b, c.a)
                c.queries.append({
                    "principle_id": principle.id,
                    "k": k,
                    "order": order,
                    "question": question(c.prompt.messages, principle.text, first, second),
                })


def demonstrations(const: Constitution, fb) -> list[dict]:
    """The comparison demonstrations the feedback settings ``fb`` ask for, as chat turns."""
    examples = const.comparison_examples if fb.few_shot < 0 else const.comparison_examples[: fb.few_shot]
    if fb.chain_of_thought:
        examples = [e for e in examples if e.reasoning]
    return comparison_demos(examples, principle_texts(const), fb.chain_of_thought)


@contextlib.contextmanager
def _no_progress(total: int, desc: str):
    yield lambda n=1: None


def label(engine, comparisons, demos, cot: bool, fb, seed: int, progress=_no_progress) -> None:
    """Fill in every query's probabilities (and reasoning) and each comparison's label."""
    queries = [q for c in comparisons for q in c.queries]
    if cot:
        convs = [demos + [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": COT_CUE}]
                 for q in queries]
        params = SamplingParams(temperature=0.0, max_new_tokens=fb.cot_max_new_tokens, seed=seed + seeds.FEEDBACK_COT)
        with progress(len(convs), "reasoning") as update:
            outs = engine.generate(convs, params, progress=update) if convs else []
        for q, out in zip(queries, outs):
            q["reasoning"] = clean_reasoning(out[0])
            q["abstained"] = is_abstention(q["reasoning"])
    scored = [q for q in queries if not q.get("abstained")]
    convs = [demos + [{"role": "user", "content": q["question"]},
                      {"role": "assistant", "content": answer_turn(q.get("reasoning"))}] for q in scored]
    with progress(len(convs), "labels") as update:
        lps = engine.choice_logprobs(convs, [OPTIONS] * len(convs), progress=update) if convs else []
    for q, lp in zip(scored, lps):
        q["logprobs"] = lp
        q["p_first"] = softmax2(lp)
        q["p_a"] = q["p_first"] if q["order"] == "ab" else 1.0 - q["p_first"]
    lo, hi = fb.cot_clamp if cot else (0.0, 1.0)
    for c in comparisons:
        if c.status != "labelled":
            continue
        ok = usable(c.queries, fb.both_orders)
        if not ok:
            c.status = "abstained"
            continue
        c.p_a_raw = sum(q["p_a"] for q in ok) / len(ok)
        c.p_a = min(max(c.p_a_raw, lo), hi)


def usable(queries: list[dict], both_orders: bool) -> list[dict]:
    """Scored queries; with both orders, only principles whose two orders were both scored."""
    ok = [q for q in queries if "p_a" in q]
    if not both_orders:
        return ok
    by_k: dict[int, list[dict]] = {}
    for q in ok:
        by_k.setdefault(q["k"], []).append(q)
    return [q for qs in by_k.values() if len(qs) == 2 for q in qs]


def p_a_by_order(c: Comparison) -> dict[int, list[float]]:
    """Per principle (by index) scored in both orders: p(A is better) shown first, then second."""
    by_k: dict[int, dict[str, float]] = {}
    for q in c.queries:
        if "p_a" in q:
            by_k.setdefault(q["k"], {})[q["order"]] = q["p_a"]
    return {k: [o["ab"], o["ba"]] for k, o in by_k.items() if len(o) == 2}


def consistency(c: Comparison) -> dict[int, bool]:
    """Per principle (by index) scored in both orders: did both orders prefer the same answer?"""
    return {k: (ab >= 0.5) == (ba >= 0.5) for k, (ab, ba) in p_a_by_order(c).items()}


def _mean(xs):
    return round(sum(xs) / len(xs), 6) if xs else None


def p_shown(c: Comparison, a_side: bool, both_orders: bool) -> tuple[float | None, float | None]:
    """The mean probability that answer a (``a_side``; else answer b) is the better one over
    the usable questions that showed it first, and over those that showed it second."""
    ok = usable(c.queries, both_orders)
    first = [q["p_a"] if a_side else 1 - q["p_a"] for q in ok if (q["order"] == "ab") == a_side]
    second = [q["p_a"] if a_side else 1 - q["p_a"] for q in ok if (q["order"] == "ab") != a_side]
    return _mean(first), _mean(second)


def pref_record(c: Comparison, feedback_model: str, both_orders: bool) -> dict:
    """A labelled comparison as TRL's ``prompt``/``chosen``/``rejected`` with the soft label
    ``p_chosen`` and the per-order detail (the feedback stage's ``prefs`` rows)."""
    a_wins = c.p_a >= 0.5
    p_chosen = c.p_a if a_wins else 1.0 - c.p_a
    chosen, rejected = (c.a, c.b) if a_wins else (c.b, c.a)
    shown_first, shown_second = p_shown(c, a_wins, both_orders)
    agree = list(consistency(c).values())
    return {
        "id": c.id,
        "source": c.source,
        "category": c.prompt.category,
        "prompt": c.prompt.messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": round(p_chosen, 6),
        "margin": round(2 * p_chosen - 1, 6),
        "principle_ids": [p.id for p in c.principles],
        "p_chosen_shown_first": shown_first,
        "p_chosen_shown_second": shown_second,
        "position_consistent": all(agree) if agree else None,
        "feedback_model": feedback_model,
    }


# -- the reusable judge ------------------------------------------------------------------


@dataclass
class Verdict:
    """One comparison's label: ``p_a`` is the probability that answer a is the better one
    (clamped with a chain of thought; None when the pair is identical or every question was
    an abstention), ``questions`` each asked question's principle, order, probability that
    the answer shown first is better, and reasoning."""

    id: str
    p_a: float | None
    status: str  # labelled | identical | abstained
    principle_ids: list[str]
    position_consistent: bool | None  # every principle's two orders agree (None: one order)
    questions: list[dict]

    @property
    def p_b(self) -> float | None:
        return None if self.p_a is None else 1.0 - self.p_a


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn; a message list is kept."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise CaiError(f"a prompt must be a string or a list of {{role, content}} messages; got {type(prompt).__name__}")


def as_text(answer) -> str:
    """An answer as text: a string, or a message list's last assistant turn (TRL's
    conversational completions)."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, list) and answer and isinstance(answer[-1], dict) and "content" in answer[-1]:
        return str(answer[-1]["content"])
    raise CaiError(f"an answer must be a string or a list of messages; got {type(answer).__name__}")


def pair_id(messages: list[dict], a: str, b: str) -> str:
    """A comparison id from its content: the same pair gets the same principles."""
    blob = json.dumps([messages, a, b], ensure_ascii=False, sort_keys=True)
    return "pair-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class Judge:
    """The feedback stage's labeller on any engine.

    ``settings`` is a :class:`cai.config.FeedbackConfig` (its ``both_orders``,
    ``principles_per_comparison``, ``few_shot``, ``chain_of_thought``, ``cot_clamp`` and
    ``cot_max_new_tokens`` are read); ``principle`` names one principle to ask under instead
    of sampling from ``source``'s pool (the constitution's comparison principles for
    harmlessness, its helpfulness principles for helpfulness). The engine's request cache,
    when it has one, keeps every answer: a rerun asks only what was not answered.
    """

    def __init__(self, engine, constitution: Constitution, settings=None, seed: int = 0, principle: str | None = None,
                 source: str = "harmlessness", model_name: str = ""):
        from cai.config import FeedbackConfig

        if source not in SOURCES:
            raise CaiError(f"judge source must be one of {', '.join(SOURCES)}; got {source!r}")
        self.engine, self.const, self.seed, self.source = engine, constitution, seed, source
        self.fb = settings if settings is not None else FeedbackConfig()
        self.model_name = model_name
        pool = principle_pool(constitution, source)
        if principle is not None:
            known = {p.id: p for p in constitution.comparison_principles + constitution.helpfulness_principles}
            if principle not in known:
                raise CaiError(f"no comparison principle '{principle}' in constitution '{constitution.name}' "
                               f"(have: {', '.join(known)})")
            pool = [known[principle]]
        if not pool:
            raise CaiError(f"constitution '{constitution.name}' has no {source} comparison principles; "
                           "name one with principle=, or judge harmlessness")
        self.pool = pool
        self.demos = demonstrations(constitution, self.fb)

    @classmethod
    def from_config(cls, cfg, engine=None, principle: str | None = None, source: str = "harmlessness",
                    cache_path=None) -> "Judge":
        """The judge of a run config: its feedback model (``feedback.model``, else
        ``engine.model``) on ``cfg.engine``'s settings, its constitution, feedback settings
        and seed. ``cache_path``: a request-cache file (a run's ``cache/requests.sqlite``
        shares that run's answers)."""
        import dataclasses

        from cai.constitution import load_constitution

        model = cfg.feedback.model or cfg.engine.model
        if engine is None:
            from cai.engines import build_engine

            engine = build_engine(dataclasses.replace(cfg.engine, model=model), cache_path=cache_path,
                                  progress=lambda m: None)
        return cls(engine, load_constitution(cfg.data.constitution), cfg.feedback, cfg.seed, principle, source,
                   model_name=model)

    def comparison(self, prompt, a, b, id: str | None = None) -> Comparison:
        messages, a, b = as_messages(prompt), as_text(a), as_text(b)
        cid = id if id is not None else pair_id(messages, a, b)
        return comparison(cid, "", self.source, Prompt(id=cid, messages=messages), a, b, self.pool,
                          self.fb.principles_per_comparison, self.seed)

    def label(self, comparisons: list[Comparison], progress=_no_progress) -> list[Comparison]:
        """Ask every comparison's questions (batched over all of them) and fill in the labels."""
        build_queries(comparisons, self.fb.both_orders)
        label(self.engine, comparisons, self.demos, self.fb.chain_of_thought, self.fb, self.seed, progress)
        return comparisons

    def compare_many(self, items, ids: list[str] | None = None, progress=_no_progress) -> list[Verdict]:
        """``items``: (prompt, a, b) triples, judged in one batch."""
        items = list(items)
        if ids is not None and len(ids) != len(items):
            raise CaiError(f"compare_many: {len(ids)} ids for {len(items)} pairs")
        comps = [self.comparison(p, a, b, None if ids is None else ids[i]) for i, (p, a, b) in enumerate(items)]
        return [verdict(c) for c in self.label(comps, progress)]

    def compare(self, prompt, a, b, id: str | None = None) -> Verdict:
        """The probability that ``a`` is the better answer to ``prompt``, with per-order detail."""
        return self.compare_many([(prompt, a, b)], None if id is None else [id])[0]

    def group_scores(self, prompts, completions, groups=None) -> list[float]:
        """Each completion's mean probability of being judged better than each other
        completion of its group (0.5 when its group has no other completion, and for an
        identical or abstained pair). A group is the completions of one prompt, or with
        ``groups`` (a key per completion) the completions that share a key. Every group's
        pairs are compared in one batch: n completions ask n(n-1)/2 comparisons."""
        return self.group_verdicts(prompts, completions, groups)[0]

    def group_verdicts(self, prompts, completions, groups=None) -> tuple[list[float], list[Verdict]]:
        """:meth:`group_scores`, with the verdict of every pair asked (each group's pairs in
        ``itertools.combinations`` order, the groups in order of first appearance)."""
        if len(prompts) != len(completions) or (groups is not None and len(groups) != len(prompts)):
            raise CaiError(f"{len(prompts)} prompts for {len(completions)} completions"
                           + ("" if groups is None else f" and {len(groups)} group keys"))
        members_of: dict = {}
        for i, p in enumerate(prompts):
            key = json.dumps(as_messages(p), sort_keys=True) if groups is None else groups[i]
            members_of.setdefault(key, []).append(i)
        pairs = [(i, j) for members in members_of.values() for i, j in itertools.combinations(members, 2)]
        verdicts = self.compare_many([(prompts[i], completions[i], completions[j]) for i, j in pairs])
        wins = [0.0] * len(prompts)
        for (i, j), v in zip(pairs, verdicts):
            p = 0.5 if v.p_a is None else v.p_a
            wins[i] += p
            wins[j] += 1.0 - p
        sizes = {i: len(members) for members in members_of.values() for i in members}
        return [wins[i] / (sizes[i] - 1) if sizes[i] > 1 else 0.5 for i in range(len(prompts))], verdicts

    def reward_function(self):
        """A TRL reward function (``reward_funcs=`` of GRPOTrainer or RLOOTrainer):
        ``f(prompts, completions, **kwargs) -> list[float]``, :meth:`group_scores`."""

        def cai_judge(prompts, completions, **kwargs) -> list[float]:
            return self.group_scores(prompts, completions)

        return cai_judge


def verdict(c: Comparison) -> Verdict:
    agree = list(consistency(c).values())
    questions = [{k: q[k] for k in ("principle_id", "order", "p_first", "p_a", "reasoning", "abstained") if k in q}
                 for q in c.queries]
    return Verdict(id=c.id, p_a=c.p_a, status=c.status, principle_ids=[p.id for p in c.principles],
                   position_consistent=all(agree) if agree else None, questions=questions)


# -- a file of pairs (``cai label``) -------------------------------------------------------


@dataclass
class Pair:
    id: str
    prompt: list[dict]
    a: str
    b: str
    given_chosen: bool  # a is the file's ``chosen`` (b its ``rejected``); False: two unranked responses


def read_pairs(path) -> list[Pair]:
    """The pairs of a JSONL/JSON/Parquet file: TRL's ``prompt``/``chosen``/``rejected`` (or
    hh-rlhf's two transcripts), read as the training stages read a pair file
    (:func:`cai.datafiles.preference_row`); or a ``prompt`` with two unranked responses, as
    ``responses`` (a list of two) or ``response_a``/``response_b``. Ids are each row's ``id``
    or ``pair-<n>``."""
    from pathlib import Path

    from cai.datafiles import final_answer, messages, preference_row, require_user_turn
    from cai.prompts import read_records

    path = Path(path)
    if not path.is_file():
        raise CaiError(f"--pairs: '{path}' is not a file (give a JSONL, JSON or Parquet file of pairs)")
    out, seen = [], {}
    for n, (where, rec) in enumerate(read_records(path)):
        if not isinstance(rec, dict):
            raise CaiError(f"{where}: a pair must be an object with 'prompt' and 'chosen'/'rejected' or two responses")
        if "responses" in rec or "response_a" in rec or "response_b" in rec:
            if rec.get("prompt") is None:
                raise CaiError(f"{where}: a pair of responses needs a 'prompt' field")
            if "responses" in rec:
                two = rec["responses"]
                if not isinstance(two, list) or len(two) != 2:
                    raise CaiError(f"{where}: field 'responses' must be a list of exactly two responses")
                names = ["responses[0]", "responses[1]"]
            else:
                missing = [k for k in ("response_a", "response_b") if rec.get(k) is None]
                if missing:
                    raise CaiError(f"{where}: no field '{missing[0]}'; give response_a and response_b")
                two, names = [rec["response_a"], rec["response_b"]], ["response_a", "response_b"]
            prompt = messages(rec["prompt"], where, "prompt", "user")
            require_user_turn(prompt, where, "prompt")
            a, b = (final_answer(messages(r, where, name, "assistant"), where, name) for r, name in zip(two, names))
            given = False
        else:
            row = preference_row(rec, where)
            prompt, a, b = row["prompt"], row["chosen"][0]["content"], row["rejected"][0]["content"]
            given = True
        pid = str(rec.get("id", f"pair-{n}"))
        if pid in seen:
            raise CaiError(f"{where}: id '{pid}' is used twice (also at {seen[pid]}); ids must be unique")
        seen[pid] = where
        out.append(Pair(pid, prompt, a, b, given))
    if not out:
        raise CaiError(f"--pairs: '{path}' has no pairs")
    return out


def label_summary(comparisons: list[Comparison], pairs: list[Pair]) -> dict:
    """Counts, the judge's reliability on these pairs (:func:`cai.judge_stats.judge_reliability`
    over every principle asked in both orders: position consistency with its Wilson interval,
    decisiveness in one order and over both, at chance or not), the mean |p - 0.5| of the
    labels, and the agreement with the file's ``chosen`` where it gives one."""
    from cai.judge_stats import judge_reliability, yes_no

    labelled = [c for c in comparisons if c.status == "labelled"]
    ranked = [(c, p) for c, p in zip(comparisons, pairs) if c.status == "labelled" and p.given_chosen]
    items = [yes_no(orders) for c in labelled for orders in p_a_by_order(c).values()]
    return {
        "pairs": len(comparisons),
        "labelled": len(labelled),
        "identical": sum(c.status == "identical" for c in comparisons),
        "abstained": sum(c.status == "abstained" for c in comparisons),
        "judge_reliability": judge_reliability(items),
        "label_decisiveness": round(sum(abs(c.p_a - 0.5) for c in labelled) / len(labelled), 4) if labelled else None,
        "agrees_with_given_chosen": round(sum(c.p_a >= 0.5 for c, _ in ranked) / len(ranked), 4) if ranked else None,
        "given_pairs": len(ranked),
    }


def describe_reliability(rel: dict | None) -> str:
    """One line on the judge's reliability for a terminal."""
    if not rel:
        return "judge reliability: no question was scored"
    if rel.get("position_consistency") is None:
        return f"judge reliability: {rel['note']}; decisiveness {rel['decisiveness_one_order']}"
    lo, hi = rel["position_consistency_ci"]
    verdict = "AT CHANCE: its labels carry no information" if rel["at_chance"] else "better than chance"
    return (f"judge reliability: both orders agree on {rel['position_consistency']:.0%} of {rel['n']} questions "
            f"(95% interval {lo:.2f}-{hi:.2f}), decisiveness over both orders {rel['decisiveness_all_orders']}: "
            f"{verdict}")
