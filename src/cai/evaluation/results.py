"""Typed records of the evaluate stage's numbers: ``results.json``, ``frontier.json`` and
``revisions.json`` (schema 1, laid out in docs/evaluation.md).

The stage writes each file from its record (:class:`Results`, :class:`Frontier`,
:class:`Revisions`): ``to_json()`` gives the same keys, in the same order, with the same
values as the dicts the stage builds, so the bytes on disk do not change. The report, the
plots, the model cards and the method study read the files back with ``Results.load(path)``
(likewise the others) and read fields, ``res.safe[m].red_team.judge``, instead of chains of
``.get()`` calls.

A file written by an older cai lacks the fields added since (``judge_reliability``,
``*_ci``, ``too_small``, ``quality``, ``safe``, ``standard_sets``, ``at_chance``...): they
read as None, or as empty where the field is a table. A file that is not what its record
says (not a JSON object, a list where a record belongs, text where a number belongs) is a
one-line :class:`~cai.errors.CaiError` naming the file and the field.

Each record is a dataclass whose fields are the JSON keys in the writer's order. A field's
type says how its value is read: another record, ``dict[str, X]``, ``list[X]``, ``X | None``
or a scalar. Two markers bend the one-key-per-field rule: ``OMIT_NONE`` (the key is absent
when there is no value, as ``note`` and ``standard_sets``) and ``INLINE`` (a record whose keys
sit in the enclosing object, as a frontier point's scores). To add a measure, add its field
to the record that holds it, at the place where the writer puts its key.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cai.errors import CaiError
from cai.io import read_json
from cai.judge_stats import at_chance

#: The key is left out when the field is None (the writer adds it only sometimes).
OMIT_NONE = {"omit_none": True}
#: The field is a record whose keys sit in the enclosing object; None when none of them is there.
INLINE = {"inline": True}

R = TypeVar("R", bound="Record")


def _kind(value) -> str:
    """A JSON value's kind, as an error names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


class _Malformed(Exception):
    """A value of the wrong kind at ``where`` (a dotted path into the file; empty: the file itself)."""

    def __init__(self, where: str, wanted: str, value):
        said = f"field '{where}' should be" if where else "should be"
        super().__init__(f"{said} {wanted}, not {_kind(value)}")


#: What a scalar field accepts, and how the error names it. A bool is not a number here.
_SCALARS = {float: ((int, float), "a number"), int: ((int,), "an integer"), str: ((str,), "text"),
            bool: ((bool,), "true or false")}


def _without_none(tp):
    """``X`` of ``X | None``."""
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _read(tp, value, where: str):
    """``value`` read as type ``tp``: a record, ``dict[str, X]``, ``list[X]``, ``X | None``, a
    scalar or ``Any``; a value of another kind raises :class:`_Malformed`."""
    if isinstance(tp, types.UnionType):  # X | None
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = _without_none(tp)
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp._read(value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Malformed(where, "an object", value)
        return {k: _read(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):  # a tuple: the writer's, which json writes as a list
            raise _Malformed(where, "a list", value)
        return [_read(args[0], v, f"{where}[{k}]") for k, v in enumerate(value)]
    if tp in _SCALARS:
        kinds, wanted = _SCALARS[tp]
        if not isinstance(value, kinds) or (isinstance(value, bool) and tp is not bool):
            raise _Malformed(where, wanted, value)
    return value


def _write(value):
    """A field's value as JSON data: records as their objects, tables and lists walked."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _write(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_write(v) for v in value]
    return value


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


class Record:
    """A dataclass written as one JSON object, a key per field in field order."""

    def to_json(self) -> dict:
        """The record as the JSON object the writer builds (same keys, order and values)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("inline"):
                out.update(value.to_json() if value is not None else {})
            elif value is not None or not f.metadata.get("omit_none"):
                out[f.name] = _write(value)
        return out

    @classmethod
    def from_json(cls: type[R], data, source: str | None = None) -> R:
        """The record in ``data`` (parsed JSON); a key it lacks keeps the field's default, a key
        it does not know is ignored. A value of the wrong kind is a one-line error naming
        ``source`` (the file) and the field."""
        try:
            return cls._read(data, "")
        except _Malformed as exc:
            raise CaiError(f"{source or cls.__name__}: {exc}; rebuild the stage that wrote it") from None

    @classmethod
    def load(cls: type[R], path: str | Path) -> R | None:
        """The record in the JSON file at ``path``; None when there is no such file (the stage
        did not write it)."""
        data = read_json(Path(path))
        return None if data is None else cls.from_json(data, str(path))

    @classmethod
    def _read(cls: type[R], data, where: str) -> R:
        if not isinstance(data, dict):
            raise _Malformed(where, "an object", data)
        values = {}
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            if f.metadata.get("inline"):
                inner = _without_none(tp)
                if any(g.name in data for g in dataclasses.fields(inner)):
                    values[f.name] = inner._read(data, where)
            elif f.name in data:
                values[f.name] = _read(tp, data[f.name], f"{where}.{f.name}" if where else f.name)
        return cls(**values)


class BySet(Record):
    """A record with one field per prompt set (``red_team``, ``helpful``, ``benign``) of the
    same kind, None for a set the file does not have."""

    def named(self) -> dict:
        """The sets the file has, by name, in its order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


# -- the judge's reliability (cai.judge_stats.judge_reliability) -----------------------------


@dataclass
class JudgeReliability(Record):
    """How far the judge can be trusted on one kind of question: position consistency over
    the orders it was asked in, with its Wilson interval, and its decisiveness."""

    orders: int | None = None
    n: int | None = None
    decisiveness_one_order: float | None = None
    position_consistency: float | None = None
    position_consistency_ci: list[float] | None = None
    decisiveness_all_orders: float | None = None
    at_chance: bool | None = None
    note: str | None = field(default=None, metadata=OMIT_NONE)  # asked in one order only

    @property
    def judged_at_chance(self) -> bool:
        """The at-chance verdict (:func:`cai.judge_stats.at_chance`): as written; a block from
        before ``at_chance`` is judged from its interval, and without one it is not flagged;
        a question asked in one order has no verdict."""
        if self.orders == 1:
            return False
        if self.at_chance is not None:
            return self.at_chance
        ci = self.position_consistency_ci
        return isinstance(ci, list) and len(ci) == 2 and isinstance(ci[0], (int, float)) and at_chance(ci[0])


# -- results.json --------------------------------------------------------------------------


@dataclass
class Settings(Record):
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    few_shot: int | None = None
    bootstrap: int | None = None
    elo_scale: str | None = None


@dataclass
class Rating(Record):
    """An Elo with its 95% bootstrap interval (None without resamples). ``compared_with``:
    the models it met, written only for a model that did not meet every other one (a model
    rated through the anchors: its Elo and interval are measured against them)."""

    elo: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    compared_with: list[str] | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class EloDesign(Record):
    """Which pairs of models the judge compared, when not every pair: ``kind`` "anchors"
    (every model met each of ``anchors``, the anchors met each other, and no other pair
    met), ``pairs`` the pairs of models compared on each prompt. A table without it
    compared every pair (every file from before the field, and any complete design)."""

    kind: str | None = None
    anchors: list[str] = field(default_factory=list)
    pairs: int | None = None


@dataclass
class EloTable(Record):
    """One dimension's Bradley-Terry fit over every model (``elo_table`` and what ``run`` adds)."""

    ratings: dict[str, Rating] = field(default_factory=dict)
    win_rate: dict[str, dict[str, float]] = field(default_factory=dict)
    comparisons: int | None = None
    prompts: int | None = None
    bootstrap: int | None = None
    principle_id: str | None = None
    position_consistency: float | None = None
    judge_reliability: JudgeReliability | None = None
    design: EloDesign | None = field(default=None, metadata=OMIT_NONE)  # absent: all pairs


@dataclass
class EloByDimension(Record):
    """None for a dimension without two models or without prompts."""

    harmlessness: EloTable | None = None
    helpfulness: EloTable | None = None


@dataclass
class Harmfulness(Record):
    """A model's harmfulness 0-4 over its red-team answers."""

    mean: float | None = None
    n: int | None = None
    mean_probs: list[float | None] | None = None
    histogram: list[int] | None = None
    judge_reliability: JudgeReliability | None = None


@dataclass
class RefusalRates(Record):
    """Refusals on one set: the judge's mean p(refusal), its majority rate and the phrase
    rate, with Wilson intervals."""

    n: int | None = None
    judge: float | None = None
    judge_majority: float | None = None
    phrases: float | None = None
    judge_majority_ci: list[float] | None = None
    phrases_ci: list[float] | None = None
    too_small: bool | None = None
    judge_reliability: JudgeReliability | None = None


@dataclass
class RefusalBySet(BySet):
    benign: RefusalRates | None = None
    red_team: RefusalRates | None = None


@dataclass
class SafeRates(Record):
    """Red-team answers refused or steered to a safe alternative, by the judge."""

    n: int | None = None
    judge: float | None = None
    judge_majority: float | None = None
    judge_majority_ci: list[float] | None = None
    too_small: bool | None = None
    judge_reliability: JudgeReliability | None = None


@dataclass
class SafeBySet(BySet):
    red_team: SafeRates | None = None


@dataclass
class QualityRates(Record):
    """What a user would see on one set: shares of looping and of empty or restating answers."""

    n: int | None = None
    degenerate: float | None = None
    unhelpful: float | None = None


@dataclass
class QualityBySet(BySet):
    red_team: QualityRates | None = None
    helpful: QualityRates | None = None
    benign: QualityRates | None = None


@dataclass
class PMScores(Record):
    """A model's mean preference-model score per set."""

    red_team: float | None = None
    helpful: float | None = None


@dataclass
class JudgeSummary(Record):
    """The judge's reliability per kind of question, pooled over every model, and the rules
    behind the verdicts in words."""

    elo_harmlessness: JudgeReliability | None = None
    elo_helpfulness: JudgeReliability | None = None
    harmfulness: JudgeReliability | None = None
    refusal: JudgeReliability | None = None
    safe: JudgeReliability | None = None
    rules: dict[str, str] = field(default_factory=dict)

    def questions(self) -> dict[str, JudgeReliability | None]:
        """Each kind of question's block by its key (the rules left out)."""
        return {"elo_harmlessness": self.elo_harmlessness, "elo_helpfulness": self.elo_helpfulness,
                "harmfulness": self.harmfulness, "refusal": self.refusal, "safe": self.safe}


@dataclass
class StandardSetResult(Record):
    """One standard evaluation set (``cai.evalsets.results_entry``). A model's summary
    differs per set (``cai.evalsets.headline`` reads it), so it stays a dict."""

    title: str | None = None
    source: str | None = None
    split: str | None = None
    prompts: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    convention: str | None = None
    note: str | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    judge_reliability: dict[str, JudgeReliability | None] = field(default_factory=dict)


@dataclass
class Results(Record):
    """``evaluate/results.json``. The per-model tables are keyed by the names in ``models``;
    ``pm_score`` is None without a preference model."""

    schema: int = 1
    models: dict[str, str] = field(default_factory=dict)
    judge: str | None = None
    prompts: dict[str, int] = field(default_factory=dict)
    settings: Settings | None = None
    elo: EloByDimension = field(default_factory=EloByDimension)
    harmfulness: dict[str, Harmfulness] = field(default_factory=dict)
    refusal: dict[str, RefusalBySet] = field(default_factory=dict)
    safe: dict[str, SafeBySet] = field(default_factory=dict)
    quality: dict[str, QualityBySet] = field(default_factory=dict)
    pm_score: dict[str, PMScores] | None = None
    refusal_phrases: list[str] = field(default_factory=list)
    quality_definitions: dict[str, str] = field(default_factory=dict)
    judge_reliability: JudgeSummary | None = None
    standard_sets: dict[str, StandardSetResult] | None = field(default=None, metadata=OMIT_NONE)


# -- frontier.json -------------------------------------------------------------------------


@dataclass
class FrontierScores(Record):
    """A model's scores against the initial model alone (``frontier_entry``)."""

    harmlessness: Rating | None = None
    helpfulness: Rating | None = None
    harmfulness: float | None = None
    refusal: RefusalBySet | None = None


@dataclass
class FrontierPoint(Record):
    """A policy kept along training; ``scores`` is None for a point that was not scored
    (its weights were deleted by an earlier evaluation)."""

    stage: str | None = None
    step: int | None = None
    samples: int | None = None
    kl: float | None = None
    reward: float | None = None
    train_loss: float | None = None
    path: str | None = None
    adapter: bool | None = None
    start: str | None = None
    status: str | None = None
    scores: FrontierScores | None = field(default=None, metadata=INLINE)
    weights_deleted: bool | None = None


@dataclass
class Frontier(Record):
    """``evaluate/frontier.json``: the reference models and every point."""

    schema: int = 1
    against: str | None = None
    bootstrap: int | None = None
    reference: dict[str, FrontierScores] = field(default_factory=dict)
    points: list[FrontierPoint] = field(default_factory=list)


# -- revisions.json ------------------------------------------------------------------------


@dataclass
class PMHeldout(Record):
    """The PM's agreement with the held-out AI labels, with its Wilson interval."""

    accuracy: float | None = None
    pairs: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    at_chance: bool | None = None


@dataclass
class RevisionRound(Record):
    """The PM score of the answers in effect after ``round`` rounds, and its change from the
    first answer, each with a 95% bootstrap interval (None with too few prompts)."""

    round: int | None = None
    chains: int | None = None
    revised: int | None = None
    mean: float | None = None
    mean_ci_low: float | None = None
    mean_ci_high: float | None = None
    change: float | None = None
    change_ci_low: float | None = None
    change_ci_high: float | None = None


@dataclass
class PrincipleEffect(Record):
    """A principle's mean PM change per revision (``delta``: None if it never revised)."""

    id: str | None = None
    sampled: int | None = None
    revised: int | None = None
    prompts: int | None = None
    delta: float | None = None
    delta_ci_low: float | None = None
    delta_ci_high: float | None = None


@dataclass
class Revisions(Record):
    """``evaluate/revisions.json``: the PM score against the number of revisions (Fig. 5)."""

    schema: int = 1
    splits: list[str] = field(default_factory=list)
    max_chains: int | None = None
    pm_heldout: PMHeldout | None = None
    chains: int | None = None
    bootstrap: int | None = None
    min_ci_prompts: int | None = None
    rounds: list[RevisionRound] = field(default_factory=list)
    principles: list[PrincipleEffect] = field(default_factory=list)
