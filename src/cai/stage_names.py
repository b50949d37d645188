"""The pipeline's stages, by name, in the order they run.

This is the one place the order is written. The config's default ``stages``, the
pipeline, the plan and the report read it from here; none of them needs to import the
stage modules for it (``cai.stages.registry()`` maps each name to its stage).
"""

STAGES: tuple[str, ...] = (
    "prepare",
    "expand",
    "critique_revision",
    "sft",
    "feedback",
    "preference_model",
    "rl",
    "dpo",
    "evaluate",
    "report",
)

#: Stages a run takes only when they are listed in ``stages`` (not in its default):
#: ``expand`` grows the red-team train split with new prompts (docs/expand.md).
OPTIONAL_STAGES: tuple[str, ...] = ("expand",)
#: The default ``stages``: every stage but the optional ones, in order.
DEFAULT_STAGES: tuple[str, ...] = tuple(s for s in STAGES if s not in OPTIONAL_STAGES)

#: The folder of a training stage that holds its trained model (``save_pretrained``).
TRAINED_POLICIES: tuple[str, ...] = ("sft", "rl", "dpo")
#: A model setting that names the SL-CAI model this run's ``sft`` stage trains.
SL_CAI = "sl-cai"
