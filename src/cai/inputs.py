"""The run's inputs: what ``prepare`` freezes, and how the stages read the frozen prompts.

:func:`load_inputs` reads and checks a config's constitution and prompt sets (``prepare``
freezes them, ``cai validate`` checks them, ``cai plan`` counts them). The readers below
give a stage the frozen splits through the run's declared artifacts (:mod:`cai.layout`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai.errors import CaiError
from cai.prompts import SPLITS, Prompt, load_prompt_file

if TYPE_CHECKING:  # pragma: no cover
    from cai.config import RunConfig
    from cai.stage import StageContext

#: The prompt sets ``prepare`` freezes, each with train/test splits.
PROMPT_SETS = ("red_team", "helpful", "benign")
#: The optional stage whose kept prompts join the red-team train split.
EXPAND = "expand"


def prepared_prompts(ctx: "StageContext", name: str, limit: int | None = None) -> dict[str, list[Prompt]]:
    """One prompt set's frozen train/test splits from the finished prepare stage, at most
    ``limit`` prompts per split (None: all)."""
    return {s: load_prompt_file(ctx.artifact("prepare", "prompts", set=name, split=s))[:limit] for s in SPLITS}


def with_expansion(cfg: "RunConfig", needs: tuple[str, ...]) -> tuple[str, ...]:
    """``needs`` plus the ``expand`` stage when the config expands the red-team prompts
    (``expand.count`` > 0): the stages that read red-team train prompts declare it so."""
    return tuple(needs) + ((EXPAND,) if cfg.expand.count > 0 else ())


def expanded_prompts(ctx: "StageContext") -> list[Prompt]:
    """The ``expand`` stage's kept prompts (none when ``expand.count`` is 0). They are more
    red-team *train* prompts; test splits are never expanded."""
    if ctx.cfg.expand.count <= 0:
        return []
    path = ctx.artifact(EXPAND, "prompts", split="train")
    ctx.record_input("expand", path)
    return load_prompt_file(path) if path.is_file() and path.stat().st_size else []


def red_team_prompts(ctx: "StageContext", limit: int | None = None) -> dict[str, list[Prompt]]:
    """The red-team splits a data stage reads: the prepared ones, at most ``limit`` per split,
    with the ``expand`` stage's kept prompts after them in train (all of them: their number
    is ``expand.count``'s business)."""
    prompts = prepared_prompts(ctx, "red_team", limit)
    prompts["train"] = prompts["train"] + expanded_prompts(ctx)
    return prompts


def load_inputs(cfg: "RunConfig"):
    """The constitution and the three prompt sets of a config, validated: what ``prepare``
    freezes, ``cai validate`` checks and ``cai plan`` counts."""
    from cai.constitution import load_constitution
    from cai.evaluation.sets import load_source

    const = load_constitution(cfg.data.constitution)
    sets = {}
    for name in PROMPT_SETS:
        splits = load_source(getattr(cfg.data, name), cfg.data.test_fraction, cfg.seed)
        if cfg.data.max_per_split is not None:
            splits = {s: ps[: cfg.data.max_per_split] for s, ps in splits.items()}
        check_splits(f"data.{name} '{getattr(cfg.data, name)}'", splits, cfg.data.test_fraction,
                     NEEDED_SPLITS[name])
        sets[name] = splits
    return const, sets


#: The splits each prompt set must have prompts in: red-team prompts are trained on and
#: held out; the others are held out (and mixed in where they have train prompts).
NEEDED_SPLITS = {"red_team": ("train", "test"), "helpful": ("test",), "benign": ("test",)}


def check_splits(label: str, splits: dict[str, list], test_fraction: float, needed=("train", "test")) -> None:
    """A one-line error when one of the ``needed`` splits of a prompt set is empty."""
    for split in needed:
        if not splits.get(split):
            n = sum(len(ps) for ps in splits.values())
            raise CaiError(
                f"{label}: its {split} split is empty ({n} prompts in all, test_fraction {test_fraction}); add "
                "prompts, give train/test files, or change data.test_fraction"
            )
