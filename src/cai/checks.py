"""The checks a config needs before anything runs that look beyond the config itself.

``RunConfig.check`` (in :mod:`cai.config`, which imports nothing of cai's above the ground
floor) checks every field's range and each section's rules. What needs an engine, an
evaluation set, a model or the file system is checked here, above them: the ``engine.serve``
template, the servers' URLs, the standard sets' names, the run folder. ``cai validate``,
``cai plan`` and ``cai run`` call :func:`check_config` first; every error is one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from cai.config import RunConfig, judge_engine_config
from cai.errors import CaiError


def check_config(cfg: RunConfig) -> None:
    """The config's own checks, then the ones that need engines and evaluation sets."""
    cfg.check()
    if cfg.engine.serve != "none":
        from cai.engines.serve import check_template

        check_template(cfg.engine.serve)
    if cfg.evaluate.judge_endpoints:
        from cai.engines.openai import check_openai_config

        try:
            check_openai_config(judge_engine_config(cfg))
        except CaiError as exc:
            raise CaiError(str(exc).replace("engine.endpoints", "evaluate.judge_endpoints")) from None
    if cfg.evaluate.sets:
        from cai.evalsets import parse_spec

        for spec in cfg.evaluate.sets:
            try:
                parse_spec(spec)
            except CaiError as exc:
                raise CaiError(f"config field 'evaluate.sets': {exc}") from None
        names = [parse_spec(spec)[0].name for spec in cfg.evaluate.sets]
        if len(set(names)) < len(names):
            raise CaiError(f"config field 'evaluate.sets': a set is named twice ({', '.join(names)})")
    if cfg.engine.kind == "openai":
        from cai.engines.openai import check_openai_config

        check_openai_config(cfg.engine)
        if "sft" in cfg.stages and not cfg.sft.model:
            raise CaiError(
                "config field 'sft.model' is empty; with engine.kind=openai the engine's model is remote, "
                "so set sft.model to a local checkpoint ('default', a directory or a hub id) to fine-tune"
            )


def check_run_dir(run_dir: str) -> None:
    """The run directory must be a folder, or a folder that can be made: its nearest
    existing parent a writable folder, and no name in it too long for the file system."""
    p = Path(run_dir).expanduser()
    parent = next((a for a in (p, *p.absolute().parents) if _exists(a)), Path("/"))
    try:
        longest = os.pathconf(parent if parent.is_dir() else parent.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    for part in p.parts:
        if len(part.encode("utf-8", "surrogateescape")) > longest:
            raise CaiError(f"config field 'run_dir': a folder name in it is {len(part.encode())} bytes long, more "
                           f"than this file system allows ({longest}); choose a shorter run_dir")
    if parent == p and not p.is_dir():
        raise CaiError(f"config field 'run_dir': '{run_dir}' is a file, not a folder; choose another run_dir")
    if not parent.is_dir():
        raise CaiError(f"config field 'run_dir': '{parent}' is a file, so '{run_dir}' cannot be made inside it; "
                       "choose another run_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CaiError(f"config field 'run_dir': '{parent}' is not writable, so '{run_dir}' cannot be "
                       f"{'written' if parent == p else 'made'}; choose another run_dir or fix its permissions")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, a loop of links...
        return False
