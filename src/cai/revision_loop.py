"""The critique -> revision loop, written once: the critique_revision stage and ``cai chat`` /
``cai revise`` (:mod:`cai.constitutional`) both run it.

A round, for every prompt at once: pick a principle, ask for a critique of the latest answer
under it, skip the prompt when the critique is empty or finds no issue, ask for the revision
(``best_of`` candidates), check the candidates with the quality gates, and retry a prompt whose
candidates were all rejected with a new principle, up to ``gate_retries`` times; a prompt still
rejected keeps its previous answer. The round's record says which of these happened
(``status``, one of the constants below).

Requests go to the engine in batches across all prompts: per round and attempt one call for
every critique and one for every revision, so a shared prefix (the demonstrations) is read once
a batch and the request cache keys (conversation and sampling settings) do not depend on who
runs the loop.

It lives in its own module rather than in :mod:`cai.constitutional` because its readers differ:
the stage wants the loop without an engine builder or a terminal formatter, and the report and
the evaluation read the status names without running anything.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from cai.conversations import (
    OPTIONS,
    best_of_conversations,
    critique_conversation,
    revision_conversation,
    revision_demos,
    revision_sampling,
    says_no_issue,
    softmax2,
)
from cai.quality import problems

# A round's status: what became of the prompt's answer in that round.
REVISED = "revised"  # an acceptable revision replaced the answer
EMPTY_CRITIQUE = "empty_critique"  # the critique came back empty: nothing to revise against
SKIPPED_NO_ISSUE = "skipped_no_issue"  # the critique found nothing wrong (skip_if_no_issue)
EMPTY_REVISION = "empty_revision"  # every try's revision was empty: the answer is kept
REJECTED = "rejected"  # every try's revision failed the quality gates: the answer is kept
STATUSES = (REVISED, EMPTY_CRITIQUE, SKIPPED_NO_ISSUE, EMPTY_REVISION, REJECTED)

# generate(conversations, sampling, what) -> each request's cleaned samples
Generate = Callable[[list, object, str], list[list[str]]]
# judge_options(conversations) -> each comparison question's (A)/(B) log-probabilities
JudgeOptions = Callable[[list], list[list[float]]]


def demonstrations(const, cr) -> tuple[list[dict], str]:
    """The constitution's critique/revision demonstrations as chat turns (``few_shot`` of them;
    all when negative), and their critiques and revisions as one text (what a revision must not
    copy)."""
    examples = const.critique_revision_examples
    if cr.few_shot >= 0:
        examples = examples[: cr.few_shot]
    text = "\n".join(t for e in examples for t in (e.critique, e.revision) if t)
    return revision_demos(examples, cr.critique), text


def revision_problems(text: str, messages: list[dict], critique: str | None, principle, cr,
                      demos: str | None = None) -> list[str]:
    """Why a revision is not kept: the quality gates' reasons (:func:`cai.quality.problems`), or
    with the gates off only an empty text (the previous answer has always been kept then)."""
    if not cr.quality_gates:
        return [] if text else ["empty"]
    return problems(text, messages, critique, (principle.critique, principle.revision), cr.gate_repeat_share, demos)


class RevisionLoop:
    """``rounds`` of critique and revision over a batch of prompts.

    ``cr`` is a ``CritiqueRevisionConfig`` (critique, skip_if_no_issue, quality_gates,
    gate_retries, best_of and the sampling settings); ``principle(prompt_id, round, attempt)``
    gives each try its principle; ``generate`` sends one batch of requests to the engine;
    ``judge_options`` (needed when ``best_of`` > 1) asks the best-of judge its comparison
    questions. ``stats`` counts what happened (statuses, gate reasons, retries)."""

    def __init__(self, cr, seed: int, demos: list[dict], demo_text: str, principle, generate: Generate,
                 judge_options: JudgeOptions | None = None, stats: Counter | None = None):
        self.cr, self.seed, self.demos, self.demo_text = cr, seed, demos, demo_text
        self.principle, self.generate, self.judge_options = principle, generate, judge_options
        self.stats = Counter() if stats is None else stats
        # the first try and, with the gates on, gate_retries more for a prompt whose revisions were rejected
        self.attempts = 1 + (cr.gate_retries if cr.quality_gates else 0)

    def run(self, prompts: list[tuple[str, list[dict]]], answers: list[str],
            rounds: int) -> tuple[list[str], list[list[dict]]]:
        """Each prompt's (``(id, messages)``) final answer and its rounds' records."""
        latest = list(answers)
        chains: list[list[dict]] = [[] for _ in prompts]
        for round_ in range(rounds):
            for k, record in enumerate(self.round(round_, prompts, latest)):
                # only an accepted revision moves the chain on; every other status keeps the answer
                if record["status"] == REVISED:
                    latest[k] = record["revision"]
                self.stats["empty_critiques"] += record["status"] == EMPTY_CRITIQUE
                self.stats["empty_revisions"] += record["status"] == EMPTY_REVISION
                self.stats["skipped_revisions"] += record["status"] == SKIPPED_NO_ISSUE
                if record["status"] == REJECTED:
                    self.stats["rejected_rounds"] += 1
                chains[k].append(record)
        return latest, chains

    def round(self, round_: int, prompts: list[tuple[str, list[dict]]], latest: list[str]) -> list[dict]:
        """One round for every prompt: tries until each prompt has an acceptable revision, a
        critique that ends the round (empty, no issue), or no tries left."""
        records: list[dict | None] = [None] * len(prompts)
        rejected_tries: list[list[dict]] = [[] for _ in prompts]  # each prompt's rejected tries, in order
        waiting = list(range(len(prompts)))  # the prompts still without a settled record this round
        for attempt in range(self.attempts):
            if not waiting:
                break
            if attempt:
                self.stats["gate_retries"] += len(waiting)
            waiting = self.attempt(round_, attempt, prompts, latest, waiting, records, rejected_tries)
        return records

    def attempt(self, round_: int, attempt: int, prompts, latest, waiting: list[int], records: list,
                rejected_tries: list[list[dict]]) -> list[int]:
        """One try of a round for the ``waiting`` prompts; fills their ``records`` and returns the
        prompts whose revisions were all rejected and may try again."""
        cr, seed = self.cr, self.seed
        # a retry draws a new principle: the rejected revision may have come from a principle
        # the model cannot act on
        principles = {k: self.principle(prompts[k][0], round_, attempt) for k in waiting}
        tag = f"round {round_ + 1}" + (f" retry {attempt}" if attempt else "")

        # critique the latest answer under the principle (all prompts in one engine call); with
        # critique off the revision request stands alone
        critiques: dict[int, str | None] = {k: None for k in waiting}
        if cr.critique:
            convs = [critique_conversation(self.demos, prompts[k][1], latest[k], principles[k]) for k in waiting]
            samples = self.generate(convs, revision_sampling(cr, seed, "critique", round_, attempt), f"{tag} critiques")
            critiques = {k: s[0] for k, s in zip(waiting, samples)}

        # an empty critique or one that finds nothing wrong ends the round: there is nothing to
        # revise against, and revising anyway teaches the model to change good answers
        to_revise = []
        for k in waiting:
            record = {"round": round_ + 1, "principle_id": principles[k].id,
                      "critique_request": principles[k].critique if cr.critique else None,
                      "critique": critiques[k], "revision_request": principles[k].revision,
                      "revision": None, "status": REVISED, "reasons": [], "attempts": rejected_tries[k]}
            if cr.critique and not critiques[k]:
                record["status"] = EMPTY_CRITIQUE
            elif cr.critique and cr.skip_if_no_issue and says_no_issue(critiques[k]):
                record["status"] = SKIPPED_NO_ISSUE
            else:
                to_revise.append(k)
            records[k] = record

        # revise: best_of samples per request, every revision of the try in one engine call
        convs = [revision_conversation(self.demos, prompts[k][1], latest[k], principles[k], critiques[k])
                 for k in to_revise]
        samples = self.generate(convs, revision_sampling(cr, seed, "revision", round_, attempt, n=cr.best_of),
                                f"{tag} revisions")

        # quality-check every candidate: a revision that loops, talks about "the response",
        # restates the prompt or copies the critique is not what the model should learn
        candidates: dict[int, list[dict]] = {}
        for k, texts in zip(to_revise, samples):
            reasons = [revision_problems(t, prompts[k][1], critiques[k], principles[k], cr, self.demo_text)
                       for t in texts]
            candidates[k] = [{"revision": t, "reasons": why} for t, why in zip(texts, reasons)]
            if cr.quality_gates:
                self.stats.update(f"gate_{w}" for why in reasons for w in why)

        # best-of-n: the judge ranks a prompt's acceptable candidates against the answer they revise
        if cr.best_of > 1:
            self.rank_candidates(prompts, latest, principles, candidates)

        # record the chosen candidate; a prompt with none acceptable retries if it has tries
        # left, else keeps its previous answer (the record's status says why)
        retry = []
        for k in to_revise:
            record = records[k]
            acceptable = [c for c in candidates[k] if not c["reasons"]]
            if cr.best_of > 1:
                record["candidates"] = candidates[k]
            chosen = max(acceptable, key=lambda c: c.get("p_better", 0.0)) if acceptable else candidates[k][0]
            record["revision"], record["reasons"] = chosen["revision"], chosen["reasons"]
            if acceptable:
                if attempt:
                    self.stats["gate_replaced"] += 1
                continue
            if cr.quality_gates:
                self.stats["gate_rejected"] += 1
            if attempt + 1 < self.attempts:
                rejected_tries[k].append({f: record[f] for f in ("principle_id", "critique", "revision", "reasons")})
                retry.append(k)
            else:
                record["status"] = EMPTY_REVISION if record["reasons"] == ["empty"] else REJECTED
        return retry

    def rank_candidates(self, prompts, latest, principles, candidates: dict[int, list[dict]]) -> None:
        """Best-of-n: score every acceptable candidate revision by how likely the judge says it
        does what the round's revision request asks better than the answer it revises (the
        comparison question, both orders, option log-probabilities); sets ``p_better`` on each
        candidate, in place. A prompt with one acceptable candidate or none is not asked about."""
        queries = []
        for k, cands in candidates.items():
            if sum(not c["reasons"] for c in cands) > 1:
                for c in cands:
                    if not c["reasons"]:
                        for order, conv in zip(("candidate_first", "candidate_second"),
                                               best_of_conversations(prompts[k][1], principles[k],
                                                                     c["revision"], latest[k])):
                            queries.append((c, order, conv))
        if not queries:
            return
        for (c, order, _), lp in zip(queries, self.judge_options([q[2] for q in queries])):
            p = softmax2(lp) if order == "candidate_first" else 1 - softmax2(lp)
            c.setdefault("p_orders", []).append(round(p, 6))
        for cands in candidates.values():
            for c in cands:
                if "p_orders" in c:
                    c["p_better"] = round(sum(c["p_orders"]) / len(c["p_orders"]), 6)


def judge_options_with(judge, progress=None) -> JudgeOptions:
    """``judge_options`` asking ``judge()`` (the engine, built on first use: a run that never
    ranks loads no judge) the comparison questions with their (A)/(B) options.
    ``progress(total)``, when given, is a context manager yielding ``update(n)``."""
    def ask(convs):
        engine = judge()
        if progress is None:
            return engine.choice_logprobs(convs, [OPTIONS] * len(convs))
        with progress(len(convs)) as update:
            return engine.choice_logprobs(convs, [OPTIONS] * len(convs), progress=update)
    return ask
