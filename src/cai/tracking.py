"""Experiment tracking: the run's metrics sent to TensorBoard, wandb, trackio or mlflow.

``report_to`` names the trackers. The pipeline opens them once per ``cai run`` with
accelerate's tracker classes (:mod:`accelerate.tracking`), in the main process only, and
closes them at the end of the run or on an error. Stages reach them through
``StageContext.track``; the training stages log each step's row of the loop
(:func:`cai.loop.train`), evaluate its headline results. Nothing here changes an artifact:
``metrics.json`` and the PNGs are written as before.

A run has one experiment id, kept in ``RUN_DIR/tracking.json`` with the trackers that have
seen it. A resumed or extended run (an interrupted stage, a second ``cai run`` with more
stages) reads it back and continues the same experiment: TensorBoard writes into the same
folder, ``RUN_DIR/tracking/tensorboard/<id>``; wandb resumes the run with that id
(``resume="allow"``), trackio the run of that name, mlflow the run whose id it recorded.
"""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
from pathlib import Path
from typing import Callable

from cai.config import TRACKERS
from cai.errors import CaiError
from cai.io import write_json
from cai.layout import TRACKING, TRACKING_RECORD

#: The project that wandb, trackio and mlflow file the runs under.
PROJECT = "cai"


def check_installed(report_to: list[str]) -> None:
    """A one-line error for a tracker whose package is not installed (``cai validate``, ``cai run``).
    The names themselves are checked by the config (``RunConfig.rules``)."""
    for name in report_to:
        # every tracker's package imports under its own name (tensorboard, wandb, trackio, mlflow)
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise CaiError(f"config field 'report_to' lists {name}, which is not installed; "
                           f"pip install {name} (or pip install 'cai[track]'), or take it out of report_to")


class RunTracker:
    """The run's open trackers: ``log`` sends scalars to each, ``finish`` closes them all."""

    def __init__(self, trackers: list, run_id: str):
        self.trackers, self.run_id = trackers, run_id

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self, log: Callable[[str], None] = print) -> None:
        """Close every tracker; one that fails to close is said in a line, never raised (it
        would hide the error that ended the run, or fail a run whose artifacts are all written)."""
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001 - see above
                log(f"tracking: closing {tracker.name} failed: {exc}")
        self.trackers = []


def read_record(run_dir: Path) -> dict:
    """``RUN_DIR/tracking.json``: the run's experiment id and trackers ({} before the first)."""
    path = Path(run_dir) / TRACKING_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CaiError(f"{path}: unreadable ({exc}); delete it to start a new experiment") from None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise CaiError(f"{path}: no experiment id in it; delete it to start a new experiment")
    return record


def new_run_id(run_dir: Path) -> str:
    """The run folder's name and a random suffix: readable in a dashboard, unique in a project
    (wandb's ids allow letters, digits, '-' and '_')."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(run_dir).resolve().name).strip("-")[:40] or "run"
    return f"{stem}-{secrets.token_hex(4)}"


def open_tracker(report_to: list[str], run_dir: Path, log: Callable[[str], None] = print) -> RunTracker | None:
    """The run's trackers, started (None when ``report_to`` is empty). Call it in the main
    process only: the trackers are told so (their ``main_process_only`` is off), which keeps
    accelerate from setting up its process state before the stages' own ``Accelerator``."""
    if not report_to:
        return None
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    run_id = record.get("id") or new_run_id(run_dir)
    folder = run_dir / TRACKING
    trackers = []
    try:
        for name in report_to:
            tracker = _build(name, run_id, folder, record)
            tracker.main_process_only = False  # the pipeline calls this in the main process alone
            tracker.start()
            trackers.append(tracker)
            if name == "mlflow":  # mlflow picks the run's id itself: keep it to resume that run
                record["mlflow_run_id"] = tracker.active_run.info.run_id
    except BaseException:
        RunTracker(trackers, run_id).finish(log)  # those already started; the error is the one to see
        raise
    seen = list(record.get("trackers", []))
    write_json(run_dir / TRACKING_RECORD,
               {**record, "id": run_id, "trackers": seen + [n for n in report_to if n not in seen]})
    where = f" ({folder / 'tensorboard' / run_id})" if "tensorboard" in report_to else ""
    log(f"tracking: {', '.join(report_to)}, experiment {run_id}" + (" (resumed)" if record.get("id") else "") + where)
    return RunTracker(trackers, run_id)


def _build(name: str, run_id: str, folder: Path, record: dict):
    """accelerate's tracker ``name`` on experiment ``run_id``, not yet started."""
    from accelerate import tracking

    if name == "tensorboard":
        # accelerate writes to logging_dir/run_name: RUN_DIR/tracking/tensorboard/<id>, the same folder on resume
        return tracking.TensorBoardTracker(run_id, folder / "tensorboard")
    if name == "wandb":
        folder.mkdir(parents=True, exist_ok=True)  # wandb keeps its files (offline runs too) in dir/wandb
        return tracking.WandBTracker(PROJECT, id=run_id, name=run_id, resume="allow", dir=str(folder))
    if name == "trackio":
        return tracking.TrackioTracker(PROJECT, name=run_id, resume="allow")
    if name == "mlflow":
        return tracking.MLflowTracker(experiment_name=PROJECT, run_name=run_id, run_id=record.get("mlflow_run_id"))
    raise CaiError(f"config field 'report_to': unknown tracker '{name}' (available: {', '.join(TRACKERS)})")

