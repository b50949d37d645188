"""Inference-time critique and revision for any engine (like LangChain's ConstitutionalChain).

The model answers; then, for each round, it critiques its latest answer under a
principle and revises it. It is the critique_revision stage's loop
(:mod:`cai.revision_loop`: the same requests, quality gates, retries and statuses), run on
prompts given at inference time rather than on the run's red-team set, and with principles
chosen by the caller or sampled.

Python::

    from cai.constitutional import ConstitutionalChain
    chain = ConstitutionalChain.from_config(load_config("cpu-tiny"), principles=["harmful-general"])
    chain.run([[{"role": "user", "content": "How do I pick a lock?"}]])

CLI: ``cai chat`` (stdin, one message a line) and ``cai revise --prompts FILE --out OUT.jsonl``.
"""

from __future__ import annotations

from cai.constitution import Constitution, Principle, load_constitution
from cai.conversations import clean, revision_sampling, sample_principle
from cai.errors import CaiError
from cai.revision_loop import EMPTY_REVISION, REJECTED, RevisionLoop, demonstrations, judge_options_with


class ConstitutionalChain:
    """Answer, then ``rounds`` of critique and revision, batched over conversations.

    The rounds are :class:`cai.revision_loop.RevisionLoop`, the critique_revision stage's
    loop, with its settings (``cr``): the quality gates (``quality_gates``), their retries
    (``gate_retries``), each retry with a new sampled principle, and best-of-n (``best_of``,
    ranked by ``judge``, default the answering engine). Principles given with ``principles``
    stay fixed: a retry asks the same principle again, with a new seed (the user chose what
    each round is about; the retry only draws a new critique and revision)."""

    def __init__(self, engine, constitution: Constitution, cr, seed: int = 0, principles: list[str] | None = None,
                 judge=None):
        self.engine, self.const, self.cr, self.seed = engine, constitution, cr, seed
        self.judge = judge
        self.fixed: list[Principle] | None = None
        if principles:
            known = {p.id: p for p in constitution.principles}
            missing = [pid for pid in principles if pid not in known]
            if missing:
                raise CaiError(f"no principle '{missing[0]}' in constitution '{constitution.name}' "
                               f"(have: {', '.join(known)})")
            self.fixed = [known[pid] for pid in principles]
        self.demos, self.demo_text = demonstrations(constitution, cr)

    @classmethod
    def from_config(cls, cfg, principles: list[str] | None = None, engine=None) -> "ConstitutionalChain":
        """The engine (``cfg.engine``, no request cache), the constitution (``cfg.data``) and
        the critique/revision settings (``cfg.critique_revision``, gates included) of a run
        config; with ``best_of`` > 1 and a ``best_of_model``, that model's engine judges."""
        from cai.engines import build_engine

        if engine is None:
            engine = build_engine(cfg.engine, cache_path=None, progress=lambda m: None)
        judge, cr = None, cfg.critique_revision
        if cr.best_of > 1 and cr.best_of_model and cr.best_of_model != cfg.engine.model:
            import dataclasses

            judge = build_engine(dataclasses.replace(cfg.engine, model=cr.best_of_model), cache_path=None,
                                 progress=lambda m: None)
        return cls(engine, load_constitution(cfg.data.constitution), cr, cfg.seed, principles, judge)

    @property
    def rounds(self) -> int:
        return len(self.fixed) if self.fixed else self.cr.rounds

    def principle(self, prompt_id: str, round_: int, attempt: int = 0) -> Principle:
        return self.fixed[round_] if self.fixed else sample_principle(self.const, self.seed, prompt_id, round_, attempt)

    def _generate(self, convs, params, what: str = "") -> list[list[str]]:
        return [[clean(o) for o in outs] for outs in self.engine.generate(convs, params)] if convs else []

    def run(self, conversations: list[list[dict]], ids: list[str] | None = None) -> list[dict]:
        """One record per conversation, shaped like a critique_revision chain: ``id``,
        ``messages``, ``initial_response``, ``rounds`` (principle, critique, revision,
        status, the gates' reasons and the rejected tries) and ``final_response``."""
        ids = ids or [f"prompt-{k}" for k in range(len(conversations))]
        first = [s[0] for s in self._generate(conversations, revision_sampling(self.cr, self.seed, "answer"))]
        loop = RevisionLoop(self.cr, self.seed, self.demos, self.demo_text, self.principle, self._generate,
                            judge_options_with(lambda: self.judge or self.engine))
        latest, rounds = loop.run(list(zip(ids, conversations)), first, self.rounds)
        return [{"id": pid, "messages": conv, "initial_response": a, "rounds": rs, "final_response": f,
                 "revised": f != a}
                for pid, conv, a, rs, f in zip(ids, conversations, first, rounds, latest)]


def _reasons(reasons: list[str]) -> str:
    return ", ".join(reasons) or "none"


def format_record(rec: dict) -> str:
    """A chain as plain text for the terminal: each round's principle, critique and revision;
    a revision the quality gates rejected says so, and whether it was retried (with which
    principle) or the previous answer was kept."""
    lines = [f"answer: {rec['initial_response']}"]
    for r in rec["rounds"]:
        tries = r.get("attempts") or []
        for k, t in enumerate(tries):
            following = tries[k + 1]["principle_id"] if k + 1 < len(tries) else r["principle_id"]
            lines.append(f"--- round {r['round']}, principle {t['principle_id']} (rejected)")
            if t["critique"] is not None:
                lines.append(f"critique: {t['critique']}")
            lines.append(f"revision: {t['revision']}")
            lines.append(f"round {r['round']}: revision rejected ({_reasons(t['reasons'])}), "
                         f"retrying with principle {following}")
        lines.append(f"--- round {r['round']}, principle {r['principle_id']} ({r['status']})")
        if r["critique"] is not None:
            lines.append(f"critique: {r['critique']}")
        if r["revision"] is not None:
            lines.append(f"revision: {r['revision']}")
        if r["status"] in (REJECTED, EMPTY_REVISION):
            what = "empty" if r["status"] == EMPTY_REVISION else _reasons(r.get("reasons") or [])
            lines.append(f"round {r['round']}: revision rejected ({what}), kept the previous answer")
    lines.append(f"final: {rec['final_response']}")
    return "\n".join(lines)
