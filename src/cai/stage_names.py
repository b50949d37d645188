"""The pipeline's stages, by name, in the order they run.

This is the one place the order is written. The config's default ``stages``, the
pipeline, the plan and the report read it from here; none of them needs to import the
stage modules for it (``cai.stages.registry()`` maps each name to its stage).
"""

STAGES: tuple[str, ...] = (
    "prepare",
    "critique_revision",
    "sft",
    "feedback",
    "preference_model",
    "rl",
    "dpo",
    "evaluate",
    "report",
)

#: The folder of a training stage that holds its trained model (``save_pretrained``).
TRAINED_POLICIES: tuple[str, ...] = ("sft", "rl", "dpo")
