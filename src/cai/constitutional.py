"""Inference-time critique and revision for any engine (like LangChain's ConstitutionalChain).

The model answers; then, for each round, it critiques its latest answer under a
principle and revises it. It is the critique_revision stage's loop, with the same
conversation builders, demonstrations and sampling settings
(``cai.conversations``), run on prompts given at inference time rather than
on the run's red-team set, and with principles chosen by the caller or sampled.

Python::

    from cai.constitutional import ConstitutionalChain
    chain = ConstitutionalChain.from_config(load_config("cpu-tiny"), principles=["harmful-general"])
    chain.run([[{"role": "user", "content": "How do I pick a lock?"}]])

CLI: ``cai chat`` (stdin, one message a line) and ``cai revise --prompts FILE --out OUT.jsonl``.
"""

from __future__ import annotations

from cai.constitution import Constitution, Principle, load_constitution
from cai.errors import CaiError
from cai.conversations import (
    clean,
    critique_conversation,
    revision_conversation,
    revision_demos,
    revision_sampling,
    sample_principle,
    says_no_issue,
)


class ConstitutionalChain:
    """Answer, then ``rounds`` of critique and revision, batched over conversations."""

    def __init__(self, engine, constitution: Constitution, cr, seed: int = 0, principles: list[str] | None = None):
        self.engine, self.const, self.cr, self.seed = engine, constitution, cr, seed
        self.fixed: list[Principle] | None = None
        if principles:
            known = {p.id: p for p in constitution.principles}
            missing = [pid for pid in principles if pid not in known]
            if missing:
                raise CaiError(f"no principle '{missing[0]}' in constitution '{constitution.name}' "
                               f"(have: {', '.join(known)})")
            self.fixed = [known[pid] for pid in principles]
        examples = constitution.critique_revision_examples
        self.demos = revision_demos(examples if cr.few_shot < 0 else examples[: cr.few_shot], cr.critique)

    @classmethod
    def from_config(cls, cfg, principles: list[str] | None = None, engine=None) -> "ConstitutionalChain":
        """The engine (``cfg.engine``, no request cache), the constitution (``cfg.data``) and
        the critique/revision settings (``cfg.critique_revision``) of a run config."""
        if engine is None:
            from cai.engines import build_engine

            engine = build_engine(cfg.engine, cache_path=None, progress=lambda m: None)
        return cls(engine, load_constitution(cfg.data.constitution), cfg.critique_revision, cfg.seed, principles)

    @property
    def rounds(self) -> int:
        return len(self.fixed) if self.fixed else self.cr.rounds

    def principle(self, prompt_id: str, round_: int) -> Principle:
        return self.fixed[round_] if self.fixed else sample_principle(self.const, self.seed, prompt_id, round_)

    def _generate(self, convs, params) -> list[str]:
        return [clean(o[0]) for o in self.engine.generate(convs, params)] if convs else []

    def run(self, conversations: list[list[dict]], ids: list[str] | None = None) -> list[dict]:
        """One record per conversation, shaped like a critique_revision chain: ``id``,
        ``messages``, ``initial_response``, ``rounds`` (principle, critique, revision,
        status) and ``final_response``."""
        ids = ids or [f"prompt-{k}" for k in range(len(conversations))]
        first = self._generate(conversations, revision_sampling(self.cr, self.seed, "answer"))
        latest = list(first)
        rounds: list[list[dict]] = [[] for _ in conversations]
        for r in range(self.rounds):
            principles = [self.principle(pid, r) for pid in ids]
            critiques: list[str | None] = [None] * len(conversations)
            if self.cr.critique:
                convs = [critique_conversation(self.demos, m, latest[i], principles[i]) for i, m in enumerate(conversations)]
                critiques = self._generate(convs, revision_sampling(self.cr, self.seed, "critique", r))
            todo = [i for i in range(len(conversations))
                    if not self.cr.critique or (critiques[i] and not (self.cr.skip_if_no_issue and says_no_issue(critiques[i])))]
            convs = [revision_conversation(self.demos, conversations[i], latest[i], principles[i], critiques[i]) for i in todo]
            revised = dict(zip(todo, self._generate(convs, revision_sampling(self.cr, self.seed, "revision", r))))
            for i in range(len(conversations)):
                status = "revised"
                if self.cr.critique and not critiques[i]:
                    status = "empty_critique"
                elif i not in revised:
                    status = "skipped_no_issue"
                elif not revised[i]:
                    status = "empty_revision"
                if status == "revised":
                    latest[i] = revised[i]
                rounds[i].append({"round": r + 1, "principle_id": principles[i].id, "critique": critiques[i],
                                  "revision": revised.get(i), "status": status})
        return [{"id": pid, "messages": conv, "initial_response": a, "rounds": rs, "final_response": f,
                 "revised": f != a}
                for pid, conv, a, rs, f in zip(ids, conversations, first, rounds, latest)]


def format_record(rec: dict) -> str:
    """A chain as plain text for the terminal."""
    lines = [f"answer: {rec['initial_response']}"]
    for r in rec["rounds"]:
        lines.append(f"--- round {r['round']}, principle {r['principle_id']} ({r['status']})")
        if r["critique"] is not None:
            lines.append(f"critique: {r['critique']}")
        if r["revision"] is not None:
            lines.append(f"revision: {r['revision']}")
    lines.append(f"final: {rec['final_response']}")
    return "\n".join(lines)
