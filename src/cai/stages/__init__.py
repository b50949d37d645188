"""One module per stage; each exposes ``STAGE`` (a :class:`cai.stage.StageSpec`).

Stage modules import :mod:`cai.stage` and shared modules, never each other. Only the
pipeline, the CLI and the plan import them, through :func:`registry`.
"""

from __future__ import annotations

import importlib

from cai.stage_names import STAGES


def registry() -> dict:
    """Every stage's spec by name, in pipeline order (:data:`cai.stage_names.STAGES`)."""
    out = {}
    for name in STAGES:
        spec = importlib.import_module(f"cai.stages.{name}").STAGE
        if spec.name != name:  # pragma: no cover - a wiring mistake, caught by the tests
            raise RuntimeError(f"cai.stages.{name} declares stage '{spec.name}'")
        out[name] = spec
    return out
