"""Constitutions: principles, comparison questions and few-shot demonstrations.

Three formats load as-is:

* cai's YAML (see ``data/constitutions/default.yaml``), validated strictly;
* Anthropic's principle JSON: ``{"harmful0": {"prompt": ["...CritiqueRequest: ..."],
  "edit_request": "...RevisionRequest: ..."}}``;
* the Hugging Face recipe's JSON: ``{"constitutions": [{"critic", "revision"}],
  "system_chat": [[{"role", "content"}, ...], ...]}``.

Neither public format carries comparison principles or a system prompt; an imported
constitution takes the default constitution's comparison principles, comparison
demonstrations and system prompt, and says so in ``notes``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cai.errors import CaiError
from cai.io import load_yaml, no_duplicate_keys, read_text

BUILTIN_DIR = Path(__file__).parent / "data" / "constitutions"

Message = dict  # {"role": "user" | "assistant" | "system", "content": str}


@dataclass
class Principle:
    id: str
    critique: str
    revision: str


@dataclass
class Contrast:
    """A principle's own contrast prompts (``feedback.mode: contrast``): the system prompts
    under which the policy writes the answer the principle favours and the one it does not."""

    positive: str
    negative: str


@dataclass
class ComparisonPrinciple:
    id: str
    text: str
    contrast: Contrast | None = None  # None: the generic template, filled from ``text``


@dataclass
class CritiqueRevisionExample:
    messages: list[Message]
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    principle_id: str | None = None


@dataclass
class ComparisonExample:
    messages: list[Message]
    response_a: str
    response_b: str
    principle_id: str
    answer: str
    reasoning: str | None = None


@dataclass
class Constitution:
    name: str
    principles: list[Principle]
    comparison_principles: list[ComparisonPrinciple]
    helpfulness_principles: list[ComparisonPrinciple] = field(default_factory=list)
    critique_revision_examples: list[CritiqueRevisionExample] = field(default_factory=list)
    comparison_examples: list[ComparisonExample] = field(default_factory=list)
    description: str = ""
    #: Its principles as a short system prompt in the assistant's own voice: what
    #: ``critique_revision.system_prompt=constitution`` samples the first answers under
    #: (context distillation). Empty: the constitution has none.
    system_prompt: str = ""
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def sample_principle(self, rng: random.Random) -> Principle:
        return rng.choice(self.principles)

    def sample_comparison(self, rng: random.Random) -> ComparisonPrinciple:
        return rng.choice(self.comparison_principles)

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise CaiError(f"constitution '{self.name}' has no principle with id '{pid}'")

    def to_yaml_dict(self) -> dict:
        """The cai YAML form, which :func:`load_constitution` reads back."""
        out = {
            "name": self.name,
            "description": self.description,
            **({"system_prompt": self.system_prompt} if self.system_prompt else {}),
            "principles": [asdict(p) for p in self.principles],
            "comparison_principles": [_drop_none(asdict(p)) for p in self.comparison_principles],
            "helpfulness_principles": [_drop_none(asdict(p)) for p in self.helpfulness_principles],
            "few_shot": {
                "critique_revision": [
                    _drop_none(asdict(e)) for e in self.critique_revision_examples
                ],
                "comparison": [_drop_none(asdict(e)) for e in self.comparison_examples],
            },
        }
        return out

    def save(self, path: Path) -> None:
        text = yaml.safe_dump(self.to_yaml_dict(), sort_keys=False, allow_unicode=True, width=100)
        path.write_text(text, encoding="utf-8")


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


# ---------------------------------------------------------------------------
# Strict validation helpers for the YAML form.


class _Check:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, msg: str):
        raise CaiError(f"{self.source}: {where}: {msg}")

    def mapping(self, obj, where: str, required: tuple, optional: tuple = ()) -> dict:
        if not isinstance(obj, dict):
            self.fail(where, f"expected a mapping with keys {', '.join(required)}")
        unknown = [k for k in obj if k not in required + optional]
        if unknown:
            self.fail(
                where,
                f"unknown key '{unknown[0]}' (allowed: {', '.join(required + optional)})",
            )
        for k in required:
            if k not in obj:
                self.fail(where, f"missing field '{k}'")
        return obj

    def text(self, obj, where: str, empty_ok: bool = False) -> str:
        if not isinstance(obj, str) or (not empty_ok and not obj.strip()):
            self.fail(where, f"expected a non-empty string, got {obj!r}")
        return obj

    def items(self, obj, where: str, min_len: int = 0) -> list:
        if obj is None:
            obj = []
        if not isinstance(obj, list):
            self.fail(where, "expected a list")
        if len(obj) < min_len:
            self.fail(where, f"needs at least {min_len} item(s); the list is empty")
        return obj

    def messages(self, obj, where: str) -> list[Message]:
        msgs = self.items(obj, where, min_len=1)
        for i, m in enumerate(msgs):
            self.mapping(m, f"{where}[{i}]", ("role", "content"))
            if m["role"] not in ("system", "user", "assistant"):
                self.fail(f"{where}[{i}].role", f"must be system, user or assistant, got {m['role']!r}")
            self.text(m["content"], f"{where}[{i}].content")
        if msgs[-1]["role"] != "user":
            self.fail(where, "must end with a user turn")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _parse_yaml_constitution(data, source: str) -> Constitution:
    c = _Check(source)
    c.mapping(
        data,
        "top level",
        ("name", "principles"),
        ("description", "system_prompt", "comparison_principles", "helpfulness_principles", "few_shot"),
    )
    name = c.text(data["name"], "name")
    principles = []
    for i, p in enumerate(c.items(data["principles"], "principles", min_len=1)):
        w = f"principles[{i}]"
        c.mapping(p, w, ("id", "critique", "revision"))
        principles.append(
            Principle(
                id=c.text(str(p["id"]), f"{w}.id"),
                critique=c.text(p["critique"], f"{w}.critique"),
                revision=c.text(p["revision"], f"{w}.revision"),
            )
        )

    def contrast(obj, where: str) -> Contrast | None:
        """A comparison principle's optional ``contrast: {positive, negative}``."""
        if obj is None:
            return None
        c.mapping(obj, where, ("positive", "negative"))
        return Contrast(positive=c.text(obj["positive"], f"{where}.positive"),
                        negative=c.text(obj["negative"], f"{where}.negative"))

    def comparisons(key: str) -> list[ComparisonPrinciple]:
        out = []
        for i, p in enumerate(c.items(data.get(key), key)):
            w = f"{key}[{i}]"
            c.mapping(p, w, ("id", "text"), ("contrast",))
            pid = c.text(str(p["id"]), f"{w}.id")
            out.append(ComparisonPrinciple(id=pid, text=c.text(p["text"], f"{w}.text"),
                                           contrast=contrast(p.get("contrast"), f"{w} (id '{pid}'): contrast")))
        return out

    comparison = comparisons("comparison_principles")
    helpfulness = comparisons("helpfulness_principles")
    few = data.get("few_shot") or {}
    c.mapping(few, "few_shot", (), ("critique_revision", "comparison"))
    cr_examples = []
    for i, e in enumerate(c.items(few.get("critique_revision"), "few_shot.critique_revision")):
        w = f"few_shot.critique_revision[{i}]"
        keys = ("messages", "response", "critique_request", "critique", "revision_request", "revision")
        c.mapping(e, w, keys, ("principle_id",))
        cr_examples.append(
            CritiqueRevisionExample(
                messages=c.messages(e["messages"], f"{w}.messages"),
                **{k: c.text(e[k], f"{w}.{k}") for k in keys[1:]},
                principle_id=e.get("principle_id"),
            )
        )
    cmp_examples = []
    for i, e in enumerate(c.items(few.get("comparison"), "few_shot.comparison")):
        w = f"few_shot.comparison[{i}]"
        c.mapping(
            e, w, ("messages", "response_a", "response_b", "principle_id", "answer"), ("reasoning",)
        )
        answer = str(e["answer"]).strip().strip("()").upper()
        if answer not in ("A", "B"):
            c.fail(f"{w}.answer", f"must be A or B, got {e['answer']!r}")
        cmp_examples.append(
            ComparisonExample(
                messages=c.messages(e["messages"], f"{w}.messages"),
                response_a=c.text(e["response_a"], f"{w}.response_a"),
                response_b=c.text(e["response_b"], f"{w}.response_b"),
                principle_id=c.text(str(e["principle_id"]), f"{w}.principle_id"),
                answer=answer,
                reasoning=e.get("reasoning"),
            )
        )
    const = Constitution(
        name=name,
        description=data.get("description") or "",
        system_prompt=c.text(data["system_prompt"], "system_prompt") if "system_prompt" in data else "",
        principles=principles,
        comparison_principles=comparison,
        helpfulness_principles=helpfulness,
        critique_revision_examples=cr_examples,
        comparison_examples=cmp_examples,
        source=source,
    )
    _check_references(const, c)
    return const


def _check_references(const: Constitution, c: _Check) -> None:
    for key, items in (
        ("principles", const.principles),
        ("comparison_principles", const.comparison_principles),
        ("helpfulness_principles", const.helpfulness_principles),
    ):
        seen = set()
        for p in items:
            if p.id in seen:
                c.fail(key, f"duplicate id '{p.id}'")
            seen.add(p.id)
    ids = {p.id for p in const.principles}
    for i, e in enumerate(const.critique_revision_examples):
        if e.principle_id is not None and e.principle_id not in ids:
            c.fail(
                f"few_shot.critique_revision[{i}].principle_id",
                f"no principle has id '{e.principle_id}'",
            )
    cids = {p.id for p in const.comparison_principles + const.helpfulness_principles}
    for i, e in enumerate(const.comparison_examples):
        if e.principle_id not in cids:
            c.fail(
                f"few_shot.comparison[{i}].principle_id",
                f"no comparison or helpfulness principle has id '{e.principle_id}'",
            )


# ---------------------------------------------------------------------------
# Public formats.

_CRITIQUE_RE = re.compile(r"^\s*(?:CritiqueRequest:)?\s*(.*?)\s*(?:\n\s*Critique:\s*)?$", re.S)
_REVISION_RE = re.compile(r"^\s*(?:RevisionRequest:)?\s*(.*?)\s*(?:\n\s*Revision:\s*)?$", re.S)


def _strip(regex, text: str) -> str:
    return regex.match(text).group(1).strip()


def _from_anthropic(data: dict, source: str) -> Constitution:
    c = _Check(source)
    principles = []
    for key, entry in data.items():
        c.mapping(entry, key, ("prompt", "edit_request"))
        prompts = entry["prompt"]
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = c.items(prompts, f"{key}.prompt", min_len=1)
        revision = _strip(_REVISION_RE, c.text(entry["edit_request"], f"{key}.edit_request"))
        if not revision:
            c.fail(f"{key}.edit_request", "has no text after 'RevisionRequest:'")
        for j, prompt in enumerate(prompts):
            critique = _strip(_CRITIQUE_RE, c.text(prompt, f"{key}.prompt[{j}]"))
            if not critique:
                c.fail(f"{key}.prompt[{j}]", "has no text after 'CritiqueRequest:'")
            pid = key if len(prompts) == 1 else f"{key}.{j}"
            principles.append(Principle(id=pid, critique=critique, revision=revision))
    if not principles:
        c.fail("top level", "no principles found; expected {\"harmful0\": {\"prompt\": [...], \"edit_request\": ...}}")
    return _with_default_comparisons(
        Constitution(name=Path(source).stem, principles=principles, comparison_principles=[], source=source),
        "Anthropic principle JSON",
    )


def _from_hf(data: dict, source: str) -> Constitution:
    c = _Check(source)
    c.mapping(data, "top level", ("constitutions",), ("system_chat",))
    principles = []
    for i, p in enumerate(c.items(data["constitutions"], "constitutions", min_len=1)):
        w = f"constitutions[{i}]"
        c.mapping(p, w, ("critic", "revision"))
        principles.append(
            Principle(
                id=f"hf-{i}",
                critique=c.text(p["critic"], f"{w}.critic"),
                revision=c.text(p["revision"], f"{w}.revision"),
            )
        )
    examples = []
    for i, chat in enumerate(c.items(data.get("system_chat"), "system_chat")):
        w = f"system_chat[{i}]"
        msgs = c.items(chat, w)
        for j, m in enumerate(msgs):
            c.mapping(m, f"{w}[{j}]", ("role", "content"))
        roles = [m["role"] for m in msgs]
        if len(msgs) < 6 or roles[-4:] != ["user", "assistant", "user", "assistant"] or roles[-5] != "assistant":
            c.fail(
                w,
                "expected a conversation ending with: assistant answer, user critique "
                "request, assistant critique, user revision request, assistant revision",
            )
        examples.append(
            CritiqueRevisionExample(
                messages=[dict(role=m["role"], content=m["content"]) for m in msgs[:-5]],
                response=msgs[-5]["content"],
                critique_request=msgs[-4]["content"],
                critique=msgs[-3]["content"],
                revision_request=msgs[-2]["content"],
                revision=msgs[-1]["content"],
            )
        )
    const = Constitution(
        name=Path(source).stem,
        principles=principles,
        comparison_principles=[],
        critique_revision_examples=examples,
        source=source,
    )
    return _with_default_comparisons(const, "Hugging Face recipe JSON")


def _with_default_comparisons(const: Constitution, fmt: str) -> Constitution:
    default = load_constitution("builtin:default")
    const.comparison_principles = default.comparison_principles
    const.helpfulness_principles = default.helpfulness_principles
    const.comparison_examples = default.comparison_examples
    const.system_prompt = default.system_prompt
    const.notes.append(
        f"imported from {fmt}; comparison principles and demonstrations and the system prompt come "
        "from the default constitution"
    )
    if not const.critique_revision_examples:
        const.critique_revision_examples = default.critique_revision_examples
        const.notes.append("no few-shot demonstrations in the file: using the default ones")
    return const


def load_constitution(spec: str | Path) -> Constitution:
    """Load ``builtin:NAME`` or a file in any supported format, validating it."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")))
            raise CaiError(f"no built-in constitution '{name}' (available: {names})")
    else:
        path = Path(spec)
        if not path.is_file():
            raise CaiError(f"constitution file '{spec}' does not exist")
    text = read_text(path, "constitution file")
    if not text.strip():
        raise CaiError(f"{path}: the constitution file is empty")
    if path.suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=no_duplicate_keys(str(path)))
        except json.JSONDecodeError as exc:
            raise CaiError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise CaiError(f"{path}: expected a JSON object at the top level")
        if "constitutions" in data:
            const = _from_hf(data, str(path))
        elif "principles" in data and "name" in data:
            const = _parse_yaml_constitution(data, str(path))
        else:
            const = _from_anthropic(data, str(path))
    else:
        data = load_yaml(text, str(path))
        const = _parse_yaml_constitution(data, str(path))
    if not const.comparison_principles:
        const.notes.append("no comparison principles: the feedback stage cannot run with it")
    return const
