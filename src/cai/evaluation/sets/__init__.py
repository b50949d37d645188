"""The standard safety evaluation sets by name: the registry, and what the rest of cai calls.

``eval:NAME`` names a published set; ``eval:NAME:PATH`` reads it from a local copy at
PATH (the set's file, or a folder holding it in the set's original layout). Without a
path the copy is looked up in ``$CAI_EVAL_DATA/NAME/``, then on the Hugging Face hub
(online only, through ``datasets``). cai ships none of their text.

Each set is one file here (its reader, its questions in cai's own words, its judgement,
its summary and headline figures; :class:`~cai.evaluation.sets.base.StandardSet` is what
they share) and one line in :data:`SETS`. Nothing outside a set's file knows its name or
its way of scoring: the functions below look the set up and ask it.

A set with a published test split (HH-RLHF; HarmBench's test/val files) keeps it; any
other is split by a hash of each prompt's id (:func:`cai.prompts.split_by_hash`, with
``data.test_fraction`` and ``seed``), so only its test part is evaluated and the rest
could train: the results say how many of how many were held out.

The judge is not the set's published classifier, and at 135M no figure is comparable with
published ones (:data:`NOT_COMPARABLE`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cai.errors import CaiError
from cai.evaluation.sets import do_not_answer, harmbench, hh_rlhf, or_bench, strongreject, xstest
from cai.evaluation.sets.base import LoadedSet, StandardSet
from cai.judge_stats import judge_reliability
from cai.prompts import Prompt

#: Every standard set, by name: one line per set.
SETS: dict[str, StandardSet] = {s.name: s for s in (
    hh_rlhf.SET,
    xstest.SET,
    harmbench.SET,
    strongreject.SET,
    do_not_answer.SET,
    or_bench.SET,
)}

PREFIX = "eval:"
ENV_DIR = "CAI_EVAL_DATA"
NOT_COMPARABLE = (
    "Not comparable with published figures: cai's judge (evaluate.judge) answers cai's own wording of the set's "
    "questions, read from option log-probabilities, not the set's published classifier; and a 135M model's "
    "answers and judgements are far from the models those figures describe."
)


def parse_spec(spec: str) -> tuple[StandardSet, str | None]:
    """``eval:NAME`` or ``eval:NAME:PATH`` -> (the set, PATH or None)."""
    if not spec.startswith(PREFIX):
        raise CaiError(f"'{spec}' is not a named evaluation set; use eval:NAME (one of {', '.join(SETS)})")
    name, _, path = spec[len(PREFIX):].partition(":")
    if name not in SETS:
        raise CaiError(f"no evaluation set '{name}' in '{spec}' (available: {', '.join(SETS)})")
    return SETS[name], (path or None)


# -- loading -----------------------------------------------------------------------------------


def load_eval_set(spec: str, test_fraction: float = 0.25, seed: int = 0) -> LoadedSet:
    """Load ``eval:NAME`` or ``eval:NAME:PATH`` as fixed train/test splits (module docstring)."""
    es, path = parse_spec(spec)
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise CaiError(f"'{spec}': '{p}' does not exist; point it at {es.title}'s file or folder")
        return es.load_local(p, test_fraction, seed)
    env = os.environ.get(ENV_DIR)
    if env and (Path(env) / es.name).exists():
        return es.load_local(Path(env) / es.name, test_fraction, seed)
    from cai.prompts import _hub_offline

    if _hub_offline():
        where = f"${ENV_DIR}/{es.name}/ (${ENV_DIR}={env})" if env else f"${ENV_DIR} (unset)"
        raise CaiError(f"'{spec}': no local copy ({where}) and the hub is offline (HF_HUB_OFFLINE); put {es.files[0]} there or "
                       f"use eval:{es.name}:PATH")
    return es.load_hub(test_fraction, seed)


def sample(prompts: list[Prompt], n: int | None, seed: int) -> list[Prompt]:
    """At most ``n`` prompts, a stable seeded sample: those with the smallest hash of
    (seed, id), in that order. The original files are grouped by category (XSTest by type),
    so the first n would cover only the first categories. None: all, in hash order."""
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(f"sample:{seed}:{p.id}".encode()).hexdigest())
    return ranked if n is None else ranked[:n]


def load_source(spec: str, test_fraction: float = 0.25, seed: int = 0, column: str | None = None) -> dict:
    """Any prompt source as fixed train/test splits: ``eval:NAME[:PATH]`` here, everything
    else through :func:`cai.prompts.load_prompt_set` (the loader the config's ``data.*``
    fields and ``cai validate --prompts`` use)."""
    if spec.startswith(PREFIX):
        return load_eval_set(spec, test_fraction, seed).splits
    from cai.prompts import load_prompt_set

    return load_prompt_set(spec, test_fraction, seed, column)


def source_files(spec: str) -> list[Path]:
    """The local files of an ``eval:`` source, where there are any (for the run's input record)."""
    es, path = parse_spec(spec)
    root = Path(path).expanduser() if path else (Path(os.environ[ENV_DIR]) / es.name if os.environ.get(ENV_DIR) else None)
    return es.local_files(root) if root is not None and root.exists() else []


# -- judging and summing up --------------------------------------------------------------------


def judge_rows(judge, rows: list[dict], progress) -> None:
    """Every named-set answer row (``row["set"]`` a name in :data:`SETS`) gets its set's
    judgement in ``row["judgement"]``, in place, from one batch of judge requests."""
    jobs = []
    for r in rows:
        if r["set"] in SETS:
            for key, conv, opts in SETS[r["set"]].questions(r):
                jobs.append((r, key, conv, opts))
    with progress(len(jobs), "standard sets") as update:
        lps = judge.choice_logprobs([j[2] for j in jobs], [j[3] for j in jobs], progress=update) if jobs else []
    got: dict[int, dict] = {}
    for (r, key, _, _), lp in zip(jobs, lps):
        got.setdefault(id(r), {})[key] = lp
    for r in rows:
        if id(r) in got:
            r["judgement"] = SETS[r["set"]].judgement(got[id(r)])


def judge_reliability_of(rows: list[dict]) -> dict:
    """The judge's reliability per question of a set, over judged rows (their ``by_order``)."""
    items: dict[str, list] = {}
    for r in rows:
        for q, orders in ((r.get("judgement") or {}).get("by_order") or {}).items():
            items.setdefault(q, []).append(orders)
    return {q: judge_reliability(x) for q, x in items.items()}


def summarise_set(name: str, rows: list[dict]) -> dict:
    """One model's figure on one set from its judged rows, with the judge's reliability on them."""
    mine = [r for r in rows if r["set"] == name and "judgement" in r]
    return {**SETS[name].summary(mine), "judge_reliability": judge_reliability_of(mine)}


def headline(name: str, summary: dict) -> list[tuple[str, float | None]]:
    """The set's headline figures, (label, value), read from one model's summary."""
    return [(f.label, f.value) for f in SETS[name].figures(summary)]


def results_entry(loaded: LoadedSet, used: int, names: list[str], rows: list[dict], test_fraction: float,
                  seed: int) -> dict:
    """``results.json["standard_sets"][NAME]``."""
    es = SETS[loaded.name]
    return {"title": es.title, "source": loaded.source, "split": loaded.split_note(test_fraction, seed),
            "prompts": used, "skipped": loaded.skipped, "convention": es.convention, "note": NOT_COMPARABLE,
            "models": {n: summarise_set(loaded.name, [r for r in rows if r["model"] == n]) for n in names},
            "judge_reliability": judge_reliability_of([r for r in rows if r["set"] == loaded.name and "judgement" in r
                                                       and r["model"] in names])}


def questions_per_answer(name: str) -> int:
    """Judge requests per answer (for ``cai plan``)."""
    return SETS[name].questions_per_answer()
