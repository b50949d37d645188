"""One module per stage; each exposes ``STAGE`` (a :class:`cai.stage.StageSpec`).

Stage modules import :mod:`cai.stage` and shared modules, never each other. Only the
pipeline, the CLI and the plan import them, through :func:`registry`.
"""

from __future__ import annotations

import importlib

from cai.errors import CaiError
from cai.stage_names import SL_CAI, STAGES


def registry() -> dict:
    """Every stage's spec by name, in pipeline order (:data:`cai.stage_names.STAGES`)."""
    out = {}
    for name in STAGES:
        spec = importlib.import_module(f"cai.stages.{name}").STAGE
        if spec.name != name:  # pragma: no cover - a wiring mistake, caught by the tests
            raise RuntimeError(f"cai.stages.{name} declares stage '{spec.name}'")
        out[name] = spec
    return out


def check_order(cfg, finished: bool = True) -> None:
    """Each listed stage after the listed stages whose outputs it reads, and (``finished``)
    each stage it reads either listed or finished in ``run_dir``. Stages run in the order given, so one that
    reads nothing of another may come before it (feedback with its own ``feedback.policy``
    before sft)."""
    from pathlib import Path

    from cai.artifacts import read_manifest

    specs = registry()
    for i, name in enumerate(cfg.stages):
        needs = specs[name].upstream(cfg)
        late = [n for n in needs if n in cfg.stages[i + 1:]]
        if late:
            raise CaiError(f"config field 'stages': {name} reads the output of {late[0]}, listed after it; "
                           f"list {late[0]} before {name}")
        missing = [n for n in needs if finished and n not in cfg.stages and read_manifest(Path(cfg.run_dir), n) is None]
        if missing:
            section = getattr(cfg, name, None)
            model = next((f for f in ("policy", "model") if getattr(section, f, None) == SL_CAI), None)
            other = (f", or start {name} from another model than this run's SFT model ({name}.{model}={SL_CAI}): "
                     "'default', a folder or a hub id" if missing[0] == "sft" and model else "")
            raise CaiError(f"stage '{name}' needs stage '{missing[0]}'; add it to 'stages' or run it first "
                           f"(run_dir '{cfg.run_dir}' has no finished {missing[0]}){other}")
