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
folder, ``RUN_DIR/tracking/tensorboard/<id>`` (a subfolder per stage); wandb resumes the run with that id
(``resume="allow"``), trackio the run of that name, mlflow the run whose id it recorded.
"""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
from pathlib import Path
from typing import Any, Callable

from cai.config import TRACKERS
from cai.errors import CaiError
from cai.io import write_json
from cai.layout import TRACKING, TRACKING_RECORD

#: Each tracker's extra in pyproject.toml (its package is the tracker's name).
EXTRAS = {"tensorboard": "track", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
#: The project that wandb, trackio and mlflow file the runs under.
PROJECT = "cai"


def check_installed(report_to: list[str]) -> None:
    """A one-line error for a tracker whose package is not installed (``cai validate``, ``cai run``).
    The names themselves are checked by the config (``RunConfig.rules``)."""
    for name in report_to:
        # every tracker's package imports under its own name (tensorboard, wandb, trackio, mlflow)
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise CaiError(f"config field 'report_to' lists {name}, which is not installed; "
                           f"pip install {name} (or pip install 'cai[{EXTRAS[name]}]'), or take it out of report_to")


class RunTracker:
    """The run's open trackers: ``log`` sends a stage's scalars to each, ``finish`` closes them all.

    Each stage counts its own steps from 1, and a resumed stage logs again the steps after its
    last checkpoint. So that neither shows as a second curve:

    * TensorBoard gets a writer per stage, in its own folder (``<id>/<stage>``), opened at the
      stage's first step with ``purge_step`` at that step: TensorBoard's reader drops what an
      earlier attempt of the stage logged from that step on, and no other stage's points;
    * wandb, whose own step only grows within a run, gets each stage's step as a metric of
      its own (``sft/step``), which that stage's charts are drawn against;
    * trackio and mlflow take the step as it is.
    """

    def __init__(self, trackers: list, run_id: str, folder: Path | None = None):
        self.trackers, self.run_id, self.folder = trackers, run_id, folder
        self.stages: dict[str, Any] = {}  # stage -> its TensorBoard writer (None where there is no TensorBoard)

    def log(self, stage: str, values: dict[str, float], step: int) -> None:
        """``values`` (named ``<stage>/<name>``) at ``step`` of ``stage``."""
        if stage not in self.stages:
            self.stages[stage] = self._begin(stage, step)
        if self.stages[stage] is not None:
            self.stages[stage].log(values, step=step)
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.log({**values, f"{stage}/step": step})
            else:
                tracker.log(values, step=step)

    def _begin(self, stage: str, step: int):
        """A stage's first step in this run: its TensorBoard writer; wandb's step metric."""
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.run.define_metric(f"{stage}/step")
                tracker.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        if self.folder is None:
            return None
        from accelerate.tracking import TensorBoardTracker

        # accelerate writes to logging_dir/run_name; purge_step goes to the SummaryWriter
        writer = TensorBoardTracker(stage, self.folder, purge_step=step)
        writer.main_process_only = False  # (see open_tracker)
        writer.start()
        return writer

    def finish(self, log: Callable[[str], None] = print) -> None:
        """Close every tracker; one that fails to close is said in a line, never raised (it
        would hide the error that ended the run, or fail a run whose artifacts are all written)."""
        for tracker in [t for t in self.stages.values() if t is not None] + self.trackers:
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001 - see above
                log(f"tracking: closing {tracker.name} failed: {exc}")
        self.trackers, self.stages = [], {}


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
    # TensorBoard: RUN_DIR/tracking/tensorboard/<id>/<stage>, the writers opened by the stages (RunTracker)
    board = folder / "tensorboard" / run_id if "tensorboard" in report_to else None
    trackers = []
    try:
        for name in report_to:
            if name == "tensorboard":
                continue
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
    log(f"tracking: {', '.join(report_to)}, experiment {run_id}" + (" (resumed)" if record.get("id") else "")
        + (f"; tensorboard --logdir {board}" if board else ""))
    return RunTracker(trackers, run_id, board)


def _build(name: str, run_id: str, folder: Path, record: dict):
    """accelerate's tracker ``name`` (wandb, trackio, mlflow) on experiment ``run_id``, not yet started."""
    from accelerate import tracking

    if name == "wandb":
        folder.mkdir(parents=True, exist_ok=True)  # wandb keeps its files (offline runs too) in dir/wandb
        return tracking.WandBTracker(PROJECT, id=run_id, name=run_id, resume="allow", dir=str(folder))
    if name == "trackio":
        return tracking.TrackioTracker(PROJECT, name=run_id, resume="allow")
    if name == "mlflow":
        return tracking.MLflowTracker(experiment_name=PROJECT, run_name=run_id, run_id=record.get("mlflow_run_id"))
    raise CaiError(f"config field 'report_to': unknown tracker '{name}' (available: {', '.join(TRACKERS)})")

