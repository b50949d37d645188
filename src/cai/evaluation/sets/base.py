"""What every standard evaluation set has in common, and the helpers the sets share.

A set is a subclass of :class:`StandardSet` in its own file: its settings (names, hub id,
files, columns, headline figures) and four methods, :meth:`~StandardSet.read` (rows ->
prompts), :meth:`~StandardSet.questions` (what the judge is asked about one answer),
:meth:`~StandardSet.judgement` (one answer's verdict from the options' log-probabilities)
and :meth:`~StandardSet.summary` (one model's figure). Finding and reading a local copy,
the hub, a published split and the hash split are done here, the same way for every set.

Below the class: the file readers (:func:`read_rows`, :func:`cell`, :func:`hash_id`) and the
judgement helpers (:func:`by_order`, :func:`rotations`, the three-way class questions and
rates) that more than one set uses.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import cai.conversations as cv
from cai.errors import CaiError
from cai.prompts import Prompt, _dedupe_ids, split_by_hash

#: The options of a yes/no question (:func:`cai.conversations.yes_no_conversations`).
YES_NO = ["A", "B"]


@dataclass
class LoadedSet:
    """One named set, loaded: fixed splits and where they came from."""

    name: str
    splits: dict[str, list[Prompt]]
    source: str  # the file(s) read, or 'hub:ID'
    files: list[Path] = field(default_factory=list)
    published_split: bool = False  # the test split is the set's own (else a hash split)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out

    @property
    def total(self) -> int:
        return sum(len(ps) for ps in self.splits.values())

    def split_note(self, test_fraction: float, seed: int) -> str:
        n = len(self.splits.get("test", []))
        if self.published_split:
            return f"the set's own test split: {n} prompts"
        return (f"hash split of a set without a test split (data.test_fraction {test_fraction}, seed {seed}): "
                f"{n} of {self.total} prompts held out and evaluated; the other {self.total - n} are not evaluated")


@dataclass(frozen=True)
class Figure:
    """One headline figure of a set for one model."""

    label: str
    value: float | None
    n: int | None  # answers behind it
    rate: bool  # a share of the n answers (else a score)


class StandardSet:
    """One published evaluation set: where a copy of it lives, how its rows become prompts,
    what the judge is asked about each answer and how the answers add up to its figure.

    A set overrides :meth:`read`, :meth:`questions`, :meth:`judgement` and :meth:`summary`,
    and :meth:`train_file` or :meth:`local_files` where its layout needs it."""

    name: str = ""  # as in eval:NAME
    title: str = ""
    hub: str = ""  # hub dataset id
    hub_configs: tuple = (None,)  # hub subsets read (None: the default one), each passed to read()
    hub_data_dir: str | None = None
    hub_test_split: bool = False  # the hub copy's 'test' split is the set's published test split
    files: tuple[str, ...] = ()  # where the original layout puts the file, relative to a copy's root
    columns: str = ""  # the original file's columns, for error messages
    convention: str = ""  # what the figure is, in words
    headlines: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (label, path into a model's summary)
    rates: frozenset[str] = frozenset()  # the headline keys that are shares of answers

    def __repr__(self) -> str:
        return f"<standard set {self.name}>"

    # -- what each set says ---------------------------------------------------------------

    def read(self, rows: list[tuple[str, dict]], source: str, config: str | None = None) -> tuple[list[Prompt], dict]:
        """The prompts in ``rows`` ((location, record) pairs of one file or hub split), and
        the count of rows left out per reason. ``config`` is the hub subset the rows come
        from (None for a local file)."""
        raise NotImplementedError

    def questions(self, row: dict) -> list[tuple[str, list[dict], list[str]]]:
        """(key, conversation, options) of every question the judge answers about one answer
        row (its ``prompt`` messages, ``answer``, ``meta`` and ``category``)."""
        raise NotImplementedError

    def judgement(self, lps: dict[str, list[float]]) -> dict:
        """One answer's judgement from the option log-probabilities of its questions, by key.
        ``by_order`` keeps each question's option probabilities in every order it was asked
        (one order for a rating), for the judge's reliability."""
        raise NotImplementedError

    def summary(self, rows: list[dict]) -> dict:
        """One model's figure from its judged rows of this set."""
        raise NotImplementedError

    def train_file(self, test_file: Path) -> Path | None:
        """For a set that keeps a published split: the file of its train (or validation) part
        beside ``test_file``, when ``test_file`` is the published test file (the train file
        may be missing). None: the prompts read are hash-split."""
        return None

    def local_files(self, root: Path) -> list[Path]:
        """The files of a local copy whose prompts are read: ``root`` itself when it is a
        file, else the first of :attr:`files` found under it (none: [])."""
        if root.is_file():
            return [root]
        return next(([root / rel] for rel in self.files if (root / rel).is_file()), [])

    def figures(self, summary: dict) -> list[Figure]:
        """The headline figures read from one model's summary (:attr:`headlines`), each a
        share of answers (:attr:`rates`, shown with a Wilson interval over the ``n`` beside
        it) or a score. A figure missing from an older summary reads as None."""
        out = []
        for label, path in self.headlines:
            block = summary
            for key in path[:-1]:
                block = (block or {}).get(key)
            block = block or {}
            out.append(Figure(label, block.get(path[-1]), block.get("n"), path[-1] in self.rates))
        return out

    def questions_per_answer(self) -> int:
        """Judge requests per answer (for ``cai plan``), counted from :meth:`questions`."""
        return len(self.questions({"prompt": [{"role": "user", "content": ""}], "answer": "", "meta": {}}))

    # -- reading a copy -------------------------------------------------------------------

    def column(self, rows: list[tuple[str, dict]], names: tuple[str, ...], source: str,
               required: bool = True) -> str | None:
        """The first of ``names`` that the rows have (the original's name first, then a hub mirror's)."""
        have = set(rows[0][1]) if rows else set()
        for n in names:
            if n in have:
                return n
        if required:
            raise CaiError(f"{source}: no column '{names[0]}' for {self.title} (its file has {self.columns}; "
                           f"columns here: {', '.join(map(str, sorted(have))) or 'none'})")
        return None

    def read_file(self, path: Path) -> tuple[list[Prompt], dict]:
        """One local file's prompts (ids unique) and the rows left out."""
        rows = read_rows(path)
        if not rows:
            raise CaiError(f"{path}: no rows; expected {self.title}'s file with columns {self.columns}")
        prompts, skipped = self.read(rows, str(path))
        _dedupe_ids(prompts, str(path))
        return prompts, skipped

    def load_local(self, path: Path, test_fraction: float, seed: int) -> LoadedSet:
        """A local copy at ``path`` (a file, or a folder in the set's original layout)."""
        found = self.local_files(path)
        if not found:
            raise CaiError(f"{self.title}: no {' or '.join(self.files[:2])} under '{path}' (point "
                           f"eval:{self.name}:PATH at the file or at a copy of the set's folder)")
        prompts, skipped = [], {}
        for f in found:
            got, sk = self.read_file(f)
            prompts, skipped = prompts + got, merge_skipped(skipped, sk)
        source = ", ".join(map(str, found))
        if len(found) > 1:
            _dedupe_ids(prompts, source)
        paired = self.train_file(found[0])
        if paired is None:
            return LoadedSet(self.name, split_by_hash(prompts, test_fraction, seed), source, found, False, skipped)
        train, sk = self.read_file(paired) if paired.is_file() else ([], {})
        files = found + ([paired] if paired.is_file() else [])
        return _published(self.name, prompts, train, source, files, merge_skipped(skipped, sk))

    def load_hub(self, test_fraction: float, seed: int) -> LoadedSet:
        """The set from the hub (online only), through ``datasets``."""
        import datasets  # lazily: the core does not need it

        splits: dict[str, list[Prompt]] = {}
        skipped: dict = {}
        for config in self.hub_configs:
            try:
                ds = (datasets.load_dataset(self.hub, config, data_dir=self.hub_data_dir)
                      if config or self.hub_data_dir else datasets.load_dataset(self.hub))
            except Exception as exc:
                raise CaiError(f"cannot load {self.title} ('{self.hub}') from the hub: {exc}") from None
            for split, part in ds.items():
                rows = [(f"hub:{self.hub}[{config or ''}][{split}][{i}]", dict(r)) for i, r in enumerate(part)]
                if not rows:
                    continue
                got, sk = self.read(rows, f"hub:{self.hub}", config)
                splits.setdefault(split, []).extend(got)
                skipped = merge_skipped(skipped, sk)
        source = f"hub:{self.hub}"
        if self.hub_test_split and "test" in splits:
            return _published(self.name, splits["test"], splits.get("train", []), source, [], skipped)
        merged = [p for ps in splits.values() for p in ps]
        return LoadedSet(self.name, split_by_hash(merged, test_fraction, seed), source, [], False, skipped)


def _published(name: str, test: list[Prompt], train: list[Prompt], source: str, files: list[Path],
               skipped: dict) -> LoadedSet:
    """A set's own split; a prompt in both parts stays in test only."""
    test_ids = {p.id for p in test}
    return LoadedSet(name, {"train": [p for p in train if p.id not in test_ids], "test": test}, source, files, True,
                     skipped)


def merge_skipped(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


def count(skipped: dict, reason: str) -> None:
    """One more row left out for ``reason``."""
    skipped[reason] = skipped.get(reason, 0) + 1


def drop_repeats(prompts: list[Prompt], skipped: dict) -> list[Prompt]:
    """The prompts with each id kept once, the first time (a repeat counts in ``skipped``)."""
    out, seen = [], set()
    for p in prompts:
        if p.id in seen:
            count(skipped, "duplicate prompt")
            continue
        seen.add(p.id)
        out.append(p)
    return out


# -- reading the original files ----------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs of a CSV, Parquet, JSONL(.gz) or JSON file."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is read
                text = fh.read()
        elif not name.endswith(".parquet"):
            text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise CaiError(f"{path}: cannot read ({exc})") from None
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".csv"):
        return [(f"{path}:{n}", dict(r)) for n, r in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2)]
    if base.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return [(f"{path}[row {i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
        except Exception as exc:  # pyarrow raises many types for a bad file
            raise CaiError(f"{path}: cannot read as Parquet ({exc})") from None
    if base.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise CaiError(f"{path}:{n}: malformed JSON line ({exc.msg}); fix or remove that line") from None
        return out
    if base.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CaiError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise CaiError(f"{path}: expected a JSON list of records")
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    raise CaiError(f"{path}: unknown file type; expected .csv, .parquet, .jsonl(.gz) or .json")


def cell(row: dict, col: str | None, where: str, required: bool = True) -> str:
    """The stripped text of ``row[col]`` ('' for a missing column or an empty cell, which is
    an error when ``required``)."""
    value = row.get(col) if col else None
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas-written files
        value = ""
    value = str(value).strip()
    if required and not value:
        raise CaiError(f"{where}: empty '{col}'; every row needs one")
    return value


def hash_id(prefix: str, text: str) -> str:
    """A stable id for a row without one: ``PREFIX-`` and a hash of its text."""
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- asking the judge and reading its answers --------------------------------------------------


def option_probs(lp: list[float]) -> list[float]:
    """The options' normalised probabilities from their log-probabilities."""
    return cv.expected_score(lp)[1]


def yes_no_questions(key: str, row: dict, question: str, yes: str, no: str) -> list[tuple[str, list[dict], list[str]]]:
    """A yes/no question about one answer, asked with "yes" as (A) (``KEY0``), then as (B) (``KEY1``)."""
    convs = cv.yes_no_conversations(row["prompt"], row["answer"], question, yes, no)
    return [(f"{key}{k}", c, YES_NO) for k, c in enumerate(convs)]


def by_order(lp_yes_first: list[float], lp_yes_second: list[float]) -> list[list[float]]:
    """A yes/no question's ``[p_yes, p_no]`` with Yes shown as (A), then as (B)."""
    first, second = cv.softmax2(lp_yes_first), 1 - cv.softmax2(lp_yes_second)
    return [[round(first, 6), round(1 - first, 6)], [round(second, 6), round(1 - second, 6)]]


def yes_no_judgement(lps: dict[str, list[float]], key: str, figure: str) -> dict:
    """``{figure: P(yes)}`` over both orders of :func:`yes_no_questions` ``key``, with ``by_order``."""
    return {figure: round(cv.p_yes(lps[f"{key}0"], lps[f"{key}1"]), 6),
            "by_order": {key: by_order(lps[f"{key}0"], lps[f"{key}1"])}}


def rotations(lps: list[list[float]]) -> list[list[float]]:
    """Each rotation's class probabilities, in class order (in rotation r, class k was shown
    at letter (k - r) mod n: :func:`cai.conversations.rotated_probs`)."""
    n = len(lps)
    return [[round(option_probs(lp)[(k - r) % n], 6) for k in range(n)] for r, lp in enumerate(lps)]


def class_questions(row: dict, question: str, options: list[str]) -> list[tuple[str, list[dict], list[str]]]:
    """A multiple-choice question whose options are classes of answer, once per cyclic
    rotation of the options (``class0``, ``class1``, ...), so each is shown at each letter."""
    convs = cv.rotated_choice_conversations(row["prompt"], row["answer"], question, options)
    return [(f"class{k}", c, list(cv.LETTERS[:len(options)])) for k, c in enumerate(convs)]


def top_class(probs: list[float]) -> int:
    """The most probable class; a tie goes to the earlier one."""
    return max(range(len(probs)), key=lambda k: (probs[k], -k))


def class_judgement(lps: dict[str, list[float]], classes: tuple[str, ...]) -> dict:
    """The judgement of :func:`class_questions`: each class's probability averaged over the
    rotations, the most probable class, and each rotation's probabilities."""
    asked = [lps[f"class{k}"] for k in range(len(classes))]
    probs = cv.rotated_probs(asked)
    return {"probs": {c: round(p, 6) for c, p in zip(classes, probs)}, "class": classes[top_class(probs)],
            "by_order": {"class": rotations(asked)}}


# -- summaries ---------------------------------------------------------------------------------


def mean(xs) -> float | None:
    xs = list(xs)
    return round(sum(xs) / len(xs), 6) if xs else None


def by_category(items: list[tuple[str | None, object]], block) -> dict:
    """``block`` of each category's values, from ``(category, value)`` pairs (no category: 'none')."""
    return {c: block([v for k, v in items if (k or "none") == c]) for c in sorted({k or "none" for k, _ in items})}


def with_categories(items: list[tuple[str | None, object]], block) -> dict:
    """``block`` of all the values, and ``by_category`` (:func:`by_category`)."""
    return {**block([v for _, v in items]), "by_category": by_category(items, block)}


def yes_rate(items: list[tuple[str | None, float]], rate: str, mean_p: str) -> dict:
    """From ``(category, P(yes))`` per answer: the share with P(yes) > 0.5 (the judge's yes)
    as ``rate`` and the mean P(yes) as ``mean_p``, overall and per category."""
    def block(ps) -> dict:
        return {"n": len(ps), rate: mean(float(p > 0.5) for p in ps), mean_p: mean(ps)}

    return with_categories(items, block)


def class_block(probs: list[list[float]], classes: tuple[str, ...], rate: str) -> dict:
    """Answers classed by their most probable class: the share in each class, ``rate`` = the
    share in any class but the first (the answering one), and the mean probabilities."""
    top = [top_class(p) for p in probs]
    out = {"n": len(probs)}
    for k, c in enumerate(classes):
        out[c] = mean(float(t == k) for t in top)
    out[rate] = mean(float(t != 0) for t in top)
    out["mean_probs"] = {c: mean(p[k] for p in probs) for k, c in enumerate(classes)}
    return out
