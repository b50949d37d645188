"""The run folder's layout: every artifact a stage writes for others to read, by name.

This table is the one place those paths are spelled. A stage writes its declared
outputs through ``ctx.output(name)``; a stage that reads another's asks
``ctx.artifact(stage, name)``, and the report, ``cai report`` and the studies ask a
:class:`RunFolder`. Nobody else joins a stage's name to a run directory, so renaming a
file is one line here (``tests/test_architecture.py`` keeps it so).

It sits on the ground floor (it imports nothing of cai's) because its readers may not
import its writers: stages are leaves, and the report reads a run without the stages.
``StageSpec.outputs`` is each stage's row of :data:`OUTPUTS`.

A path may hold ``{split}`` (``train``/``test``), ``{set}`` (a prompt set) or ``{name}``
(one model's file); ``""`` names the stage folder itself (``figures``: its PNG files).

    RUN_DIR/
      config.yaml          the resolved configuration of the latest `cai run`
      cache.sqlite         every engine request and its answer (resume, reuse)
      servers/             managed servers' logs and pid files
      tracking.json        the experiment id of report_to's trackers (cai.tracking)
      tracking/            their local files (tensorboard/<id>/<stage>/ event files, wandb's offline runs)
      <stage>/             one folder per finished stage, manifest.json written last
      <stage>.partial/     a stage that is running or was interrupted
"""

from __future__ import annotations

from pathlib import Path

#: Where a training stage saves its ``save_pretrained`` model inside its folder.
MODEL = "model"
#: The folder of the policies rl and dpo keep along training, beside ``model/``.
POINTS = "points"
#: Written last in every finished stage's folder (:mod:`cai.artifacts`).
MANIFEST = "manifest.json"
#: The run's managed servers: their logs and pid files (``RUN_DIR/servers``).
SERVERS = "servers"
#: The run's request cache (``RUN_DIR/cache.sqlite``).
CACHE = "cache.sqlite"
#: The resolved configuration of the latest ``cai run`` (``RUN_DIR/config.yaml``).
CONFIG = "config.yaml"
#: The experiment trackers' local files (``RUN_DIR/tracking/tensorboard/<id>/<stage>``...), see cai.tracking.
TRACKING = "tracking"
#: The run's experiment id and the trackers it was sent to (``RUN_DIR/tracking.json``): a
#: resumed run continues the same experiment.
TRACKING_RECORD = "tracking.json"

#: Each stage's outputs that something else reads: name -> path inside the stage's folder.
OUTPUTS: dict[str, dict[str, str]] = {
    "prepare": {
        "constitution": "constitution.yaml",  # the constitution as cai YAML
        "prompts": "prompts/{set}/{split}.jsonl",  # a frozen prompt split
        "model": "model.json",  # the resolved engine model
    },
    "expand": {
        "prompts": "{split}.jsonl",  # kept new red-team prompts (train only)
        "dropped": "dropped.jsonl",  # every dropped candidate with its reason
        "stats": "stats.json",
    },
    "critique_revision": {
        "chains": "chains/{split}.jsonl",  # every answer -> critique -> revision chain
        "sft": "sft/{split}.jsonl",  # the SL-CAI training conversations (messages)
        "prefs": "prefs/{split}.jsonl",  # revision over first answer (prompt/chosen/rejected)
    },
    "sft": {"model": MODEL, "metrics": "metrics.json", "figures": ""},
    "feedback": {
        "comparisons": "comparisons/{split}.jsonl",  # every labelled comparison, both orders
        "prefs": "prefs/{split}.jsonl",  # prompt/chosen/rejected with soft labels
        "stats": "stats.json",
    },
    "preference_model": {"model": MODEL, "metrics": "metrics.json", "figures": ""},
    "rl": {"model": MODEL, "metrics": "metrics.json", "points": f"{POINTS}/index.json", "figures": ""},
    "dpo": {"model": MODEL, "metrics": "metrics.json", "points": f"{POINTS}/index.json", "figures": ""},
    "evaluate": {
        "results": "results.json",
        "revisions": "revisions.json",  # PM score against the number of revisions
        "frontier": "frontier.json",  # the rl/dpo points against the initial model
        "answers": "answers/{name}.jsonl",
        "figures": "",
    },
    "report": {"page": "index.html"},
}


def output_path(folder: Path, stage: str, name: str, /, **fields: str) -> Path:
    """Where ``stage`` keeps its output ``name`` inside ``folder`` (its finished folder, or
    the ``.partial`` one it is writing)."""
    try:
        pattern = OUTPUTS[stage][name]
    except KeyError:
        known = ", ".join(OUTPUTS.get(stage, {})) or "none"
        raise KeyError(f"stage '{stage}' declares no output '{name}' (its outputs: {known}; cai.layout)") from None
    try:
        rel = pattern.format(**fields)
    except KeyError as exc:
        raise KeyError(f"output '{stage}/{name}' ({pattern}) needs {exc.args[0]}=...") from None
    return Path(folder) / rel if rel else Path(folder)


class RunFolder:
    """A run directory read by artifact name (the report, ``cai report``, the studies)."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

    def _stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def finished(self, stage: str) -> bool:
        """Whether ``stage`` has a finished folder here (its manifest)."""
        return (self._stage_dir(stage) / MANIFEST).is_file()

    def path(self, stage: str, name: str, /, **fields: str) -> Path:
        """The path of ``stage``'s output ``name`` (it may not exist: check ``finished``)."""
        return output_path(self._stage_dir(stage), stage, name, **fields)

    def manifest_path(self, stage: str) -> Path:
        return self._stage_dir(stage) / MANIFEST

    def within(self, stage: str, rel: str) -> Path:
        """A path that one of ``stage``'s outputs gives relative to the stage's folder (the
        entries of a points index)."""
        return self._stage_dir(stage) / rel

    def looks_like_run(self) -> bool:
        """Whether the folder is a cai run directory (it has a prepare folder or a config.yaml)."""
        return self._stage_dir("prepare").is_dir() or (self.root / CONFIG).is_file()
