"""Several processes of one ``accelerate launch``: their process group and how they wait.

Every process runs ``cai run``. Training stages run in all of them; data stages, the
manifests and the renames run on the main process only, and the others wait for it.

That wait can last hours (a data stage generating thousands of answers, or saving and
hashing a 70B checkpoint). A collective (``broadcast``, ``barrier``) would wait inside the
process group's timeout and kill the run after it, so the others wait outside it: the main
process writes its result to a small file in the run directory and keeps a heartbeat file
fresh while it works, and the others poll for the result and stop with one line when the
heartbeat goes stale (a main process killed outside a launcher that would stop the group).
Only then do all processes meet at a barrier, which is immediate. So the process group's
timeout (``dist_timeout_s``) bounds only what collectives really wait for: a training
step's gradients, and the main process saving a mid-run checkpoint.

The run directory must be one folder that every process sees (a shared filesystem across
nodes), as the stages' artifacts already require.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from cai.errors import CaiError
from cai.io import write_json

GATE_DIR = ".cai-dist"
HEARTBEAT_S = 5.0
POLL_S = 0.5


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state(cpu: bool, timeout_s: float):
    """accelerate's process state for this launch, its process group's timeout set."""
    from accelerate import PartialState

    return PartialState(cpu=cpu, timeout=_dt.timedelta(seconds=timeout_s))


def broadcast_on_main(state, fn: Callable[[], dict]) -> dict:
    """Run a short ``fn`` on the main process only; the others wait in a broadcast, and
    fail too if it failed. For the checks before the run directory exists; long work goes
    through :class:`MainGate`."""
    from accelerate.utils import broadcast_object_list

    result, error = {}, None
    if state.is_main_process:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
            error = exc
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    broadcast_object_list(status)
    if error is not None:
        raise error
    if status[0] is not None:
        raise CaiError(f"the main process failed ({status[0]}); see its log")
    return result


def launch_token(state) -> str:
    """One id for this launch, the same in every process (the main process draws it)."""
    from accelerate.utils import broadcast_object_list

    token = [uuid.uuid4().hex[:12] if state.is_main_process else None]
    broadcast_object_list(token)
    return str(token[0])


class MainGate:
    """Work that only the main process does, which the others wait for without a collective.

    Every process calls :meth:`run` the same number of times in the same order; the n-th
    call's result is ``RUN_DIR/.cai-dist/<token>-<n>.json``. ``stale_s`` is how long the
    others accept a heartbeat that has stopped before they give up.
    """

    def __init__(self, state, run_dir: Path, token: str, stale_s: float = 120.0):
        self.state, self.token, self.stale_s = state, token, stale_s
        self.folder = Path(run_dir) / GATE_DIR
        self.calls = 0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        if state.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)  # an earlier launch's files (the run lock is held)
            self.folder.mkdir(parents=True, exist_ok=True)
            self._touch()
            self._beat = threading.Thread(target=self._heartbeat, name="cai-heartbeat", daemon=True)
            self._beat.start()
        state.wait_for_everyone()  # the folder exists before anyone polls it

    @property
    def heartbeat(self) -> Path:
        return self.folder / f"{self.token}.alive"

    def _touch(self) -> None:
        self.heartbeat.write_text(f"{os.getpid()}\n", encoding="utf-8")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._touch()
            except OSError:
                pass  # a full disk or a vanished folder: the waiting processes report the silence

    def run(self, fn: Callable[[], dict]) -> dict:
        """``fn()`` on the main process; its result (or its error) in every process."""
        self.calls += 1
        path = self.folder / f"{self.token}-{self.calls}.json"
        if self.state.is_main_process:
            try:
                result = fn()
            except BaseException as exc:
                write_json(path, {"error": f"{type(exc).__name__}: {exc}"})
                raise
            write_json(path, {"result": result})
            self.state.wait_for_everyone()
            return result
        status = self._wait(path)
        if "error" in status:  # the main process is on its way out: no barrier to meet
            raise CaiError(f"the main process failed ({status['error']}); see its log")
        self.state.wait_for_everyone()
        return status["result"]

    def _wait(self, path: Path) -> dict:
        started = time.monotonic()
        while True:
            if path.is_file():
                try:
                    return json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    pass  # being replaced: read again on the next poll
            try:
                silent = time.time() - self.heartbeat.stat().st_mtime
            except OSError:
                silent = time.monotonic() - started
            if silent > self.stale_s:
                raise CaiError(
                    f"the main process has shown no sign of life for {silent:.0f}s "
                    f"({self.heartbeat} is stale); it was probably killed: see its log"
                )
            time.sleep(POLL_S)

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=HEARTBEAT_S + 1)
            shutil.rmtree(self.folder, ignore_errors=True)
