"""Contrast pairs (``feedback.mode: contrast``): preference pairs labelled by construction.

Beyond the paper: RLCD (Yang et al. 2023) makes each pair from the same model answering
the same conversation twice, once under a prompt that asks for what a principle favours
and once under one that asks for its opposite. The positive answer is the chosen one by
construction, so no judge is asked: the lever for a small model whose own labels carry
no signal (docs/method-study.md).

* **The principle.** Each prompt gives one pair, under one principle sampled as the judge
  mode samples a comparison's (:func:`cai.judge.sample_principles`, seeded by the run's
  seed, the source and the pair id ``<prompt id>/contrast``): a comparison principle for a
  red-team prompt, a helpfulness principle for a helpfulness prompt.
* **The prompts.** The principle's own ``contrast: {positive, negative}`` in the
  constitution, else a generic template filled with its question
  (:func:`cai.conversations.contrast_prompts`). They are system prompts
  (:func:`cai.conversations.with_system_prompt`); the pair's ``prompt`` is the plain conversation,
  which is what the preference model and DPO train on.
* **The label** is ``feedback.contrast_label`` for every pair; a pair whose two answers are
  the same text says nothing and is left out, as in the judge mode.
* **The judge, as a measure** (``feedback.contrast_judge``): the feedback model labels each
  pair the usual way (:func:`cai.judge.label`: both orders, the sampled principle, the
  demonstrations), without the contrast prompts; its label is recorded beside the
  constructed one and :func:`agreement` says how often it prefers the constructed chosen
  answer. It never drops or flips a pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from cai.constitution import ComparisonPrinciple, Constitution
from cai.conversations import contrast_prompts, with_system_prompt
from cai.judge import (
    Comparison,
    build_queries,
    consistency,
    demonstrations,
    label,
    p_shown,
    principle_pool,
    sample_principles,
)
from cai.judge_stats import rate
from cai.prompts import Prompt


@dataclass
class ContrastPair:
    id: str
    split: str
    source: str  # harmlessness | helpfulness
    prompt: Prompt  # the plain conversation, without the contrast prompts
    principle: ComparisonPrinciple
    positive: str  # the system prompt of the chosen answer
    negative: str  # the system prompt of the rejected answer
    origin: str  # where the prompts come from: constitution (the principle's contrast:) | template
    chosen: str = ""  # the policy's answer under the positive prompt
    rejected: str = ""  # its answer under the negative prompt
    judged: Comparison | None = None  # the feedback model's own label of the pair (contrast_judge)

    @property
    def identical(self) -> bool:
        """Both answers are the same text: the pair carries no preference."""
        return self.chosen.strip() == self.rejected.strip()

    def conversations(self) -> list[list[dict]]:
        """The two requests to the policy: the conversation under the positive, then the negative prompt."""
        return [with_system_prompt(self.prompt.messages, self.positive),
                with_system_prompt(self.prompt.messages, self.negative)]

    def comparison(self) -> Comparison:
        """The pair as the judge sees it: answer a is the chosen one, b the rejected one, under
        the pair's principle, in the plain conversation."""
        return Comparison(self.id, self.split, self.source, self.prompt, self.chosen, self.rejected,
                          principles=[self.principle], status="identical" if self.identical else "labelled")


def draw_pairs(items: list[tuple[str, str, Prompt]], const: Constitution, seed: int) -> list[ContrastPair]:
    """One pair, its principle and its two prompts, per ``(split, source, prompt)`` item; the
    answers are filled in later."""
    pairs = []
    for split, source, prompt in items:
        cid = f"{prompt.id}/contrast"
        (principle,) = sample_principles(seed, source, cid, principle_pool(const, source), 1)
        positive, negative, origin = contrast_prompts(principle, source)
        pairs.append(ContrastPair(cid, split, source, prompt, principle, positive, negative, origin))
    return pairs


def judge_pairs(engine, pairs: list[ContrastPair], const: Constitution, fb, seed: int, progress) -> None:
    """Let the feedback model label every pair with two different answers, the usual way
    (the feedback settings ``fb``: both orders, chain of thought...); sets each one's ``judged``."""
    todo = [cp for cp in pairs if not cp.identical]
    judged = [cp.comparison() for cp in todo]
    build_queries(judged, fb.both_orders)
    label(engine, judged, demonstrations(const, fb), fb.chain_of_thought, fb, seed, progress)
    for cp, c in zip(todo, judged):
        cp.judged = c


def judge_prefers_chosen(cp: ContrastPair) -> bool | None:
    """Whether the judge gave the constructed chosen answer p > 0.5 (a tie is not a
    preference); None when it was not asked or abstained."""
    if cp.judged is None or cp.judged.status != "labelled":
        return None
    return cp.judged.p_a > 0.5


def agreement(pairs: list[ContrastPair]) -> dict:
    """How often the judge prefers the constructed chosen answer over the pairs it labelled:
    :func:`cai.judge_stats.rate` (``k`` of ``n``, ``rate``, its Wilson 95% interval ``ci``)."""
    votes = [v for v in map(judge_prefers_chosen, pairs) if v is not None]
    return rate(sum(votes), len(votes))


def pref_record(cp: ContrastPair, contrast_label: float, judge_model: str, both_orders: bool) -> dict:
    """A contrast pair as a ``prefs`` row: the judge mode's fields (TRL's ``prompt``/``chosen``/
    ``rejected``, the soft label ``p_chosen``, the per-order detail of the judge when it was
    asked), plus ``label_source``, the two prompts and the judge's own label."""
    c = cp.judged
    labelled = c is not None and c.status == "labelled"
    shown_first, shown_second = p_shown(c, True, both_orders) if labelled else (None, None)
    agree = list(consistency(c).values()) if c is not None else []
    return {
        "id": cp.id,
        "source": cp.source,
        "category": cp.prompt.category,
        "prompt": cp.prompt.messages,
        "chosen": [{"role": "assistant", "content": cp.chosen}],
        "rejected": [{"role": "assistant", "content": cp.rejected}],
        "p_chosen": round(contrast_label, 6),
        "margin": round(2 * contrast_label - 1, 6),
        "principle_ids": [cp.principle.id],
        "p_chosen_shown_first": shown_first,
        "p_chosen_shown_second": shown_second,
        "position_consistent": all(agree) if agree else None,
        "feedback_model": judge_model if c is not None else None,
        "label_source": "contrast",
        "contrast_prompts": {"positive": cp.positive, "negative": cp.negative, "origin": cp.origin},
        "judge_p_chosen": round(c.p_a, 6) if labelled else None,
    }
