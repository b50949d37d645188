"""The engine protocol every stage talks to.

Stages never call ``model.generate`` themselves. They hand an engine a list of chat
conversations and get back texts (:meth:`Engine.generate`) or the log-probability of
each of a few options as the continuation (:meth:`Engine.choice_logprobs`).

A conversation is a list of ``{"role", "content"}`` messages. When it ends with a user
turn the engine opens a new assistant turn; when it ends with an assistant turn, that
turn is a prefix the engine continues (e.g. ``"The answer is: ("``).
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

Message = dict
Conversation = list[Message]
Progress = Callable[[int], None]  # called with the number of requests just finished
#: Called once per conversation as soon as its result is complete: (index, result). The
#: request cache stores each answer this way the moment it arrives, so a failure later in
#: the same call loses nothing that was already paid for.
OnResult = Callable[[int, object], None]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Batching:
    """How an engine groups requests, as the estimates (``cai plan``, each stage's
    ``estimate``) count them: an engine reports it (:func:`cai.engines.batching`), no stage
    restates it.

    ``generate`` rows are decoded together, ``score`` questions go in one scoring pass, and
    with ``shared_prefix_once`` a prefix every row of a call shares (the few-shot
    demonstrations) is read once per batch, not once per row.
    """

    generate: int
    score: int
    shared_prefix_once: bool

    def _size(self, kind: str) -> int:
        return max(1, self.generate if kind == "generate" else self.score)

    def batches(self, rows: float, kind: str = "generate") -> int:
        """The batches of a call of ``rows`` requests (``kind``: 'generate' or 'score')."""
        return -(-int(rows) // self._size(kind)) if rows > 0 else 0

    def in_flight(self, rows: float, kind: str = "generate") -> int:
        """Rows held at once (a batch, or all the rows of a smaller call): what memory counts."""
        return min(self._size(kind), max(1, int(rows)))

    def prefix_reads(self, rows: float, kind: str = "generate") -> int:
        """How many times a call of ``rows`` requests reads the prefix they all share."""
        return self.batches(rows, kind) if self.shared_prefix_once else (int(rows) if rows > 0 else 0)

    def kept_prefix(self, prefix: int) -> int:
        """The shared prefix's tokens a batch keeps once in memory (0: each row its own copy)."""
        return prefix if self.shared_prefix_once else 0

    def decode_steps(self, rows: float, max_new_tokens: int) -> int:
        """The sequential decoding steps of one generate call of ``rows`` samples: each batch
        decodes for up to ``max_new_tokens`` steps. A step costs a fixed part whatever the
        batch (the plan's calibration), so a call of few rows gets fewer new tokens a second."""
        return self.batches(rows, "generate") * max_new_tokens


def request_seed(seed: int, conversation: Conversation, index: int) -> int:
    """A per-request, per-sample seed: results do not depend on batch composition."""
    blob = json.dumps([seed, conversation, index], sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:15], 16)


_JOINER = "\u2060"  # WORD JOINER: invisible, and no tokenizer's special token contains it


def special_strings(tok) -> list[str]:
    """The texts a tokenizer turns into special tokens (``<|im_end|>``, ``</s>``...)."""
    found = set(getattr(tok, "all_special_tokens", []) or [])
    for t in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False):
            found.add(str(t.content))
    return sorted((s for s in found if len(s) > 1), key=len, reverse=True)


def defang(text: str, specials: Sequence[str]) -> str:
    """Break special-token strings inside message text, so content can never close a turn,
    open a new one or forge the template; it is model output and user data, hence hostile.
    """
    for s in specials:
        if s in text:
            text = text.replace(s, s[0] + _JOINER + s[1:])
    return text


def render_chat(tok, conv: Conversation, specials: Sequence[str]) -> str:
    """The chat-template text of a conversation (message text defanged), ready for the
    next token: a new assistant turn after a user turn, or the continuation of a final
    assistant turn."""
    cont = conv[-1]["role"] == "assistant"
    safe = [{**m, "content": defang(m["content"], specials)} for m in conv]
    return tok.apply_chat_template(safe, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont)


class Engine(abc.ABC):
    """Generates and scores text for a list of conversations.

    Two methods make the protocol, and stages use nothing else. Both take ``progress``
    (called with counts of finished conversations, for progress bars) and ``on_result``
    (called with ``(index, result)`` for each conversation as soon as it is finished, in
    whatever order they finish); both return every result in input order.
    """

    #: A string that identifies the model and the engine settings that change results;
    #: the request cache keys on it.
    identity: str

    @abc.abstractmethod
    def generate(
        self,
        conversations: Sequence[Conversation],
        params: SamplingParams,
        progress: Progress | None = None,
        on_result: OnResult | None = None,
    ) -> list[list[str]]:
        """``params.n`` completions for every conversation, in input order."""

    @abc.abstractmethod
    def choice_logprobs(
        self,
        conversations: Sequence[Conversation],
        options: Sequence[Sequence[str]],
        progress: Progress | None = None,
        on_result: OnResult | None = None,
    ) -> list[list[float]]:
        """log p(option | conversation) for each option of each conversation.

        The score is the summed log-probability of the option's text as the
        continuation; options with a shared start are scored from the same point, so
        ``softmax`` over them is a proper normalised choice distribution.
        """

    def count_tokens(self, conversation: Conversation) -> int:
        """Prompt tokens of a conversation, for estimates (``cai plan``). Engines with a
        tokenizer count exactly; this default guesses four characters a token."""
        return sum(len(m["content"]) + 16 for m in conversation) // 4

    def close(self) -> None:  # pragma: no cover - engines with resources override
        pass


def finished(index: int, value, progress: Progress | None, on_result: OnResult | None) -> None:
    """Report one finished conversation to both callbacks (for engines' use)."""
    if on_result is not None:
        on_result(index, value)
    if progress is not None:
        progress(1)
