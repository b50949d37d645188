"""Faults in a 2-process ``accelerate launch`` (gloo on CPU): no process is left behind.

* a non-main process that raises inside a distributed training stage ends every process
  of the launch with a non-zero exit;
* a ``kill -9`` of the main process, with the launcher alive or killed with it (so that
  nobody stops the group), leaves no process waiting for ever: the other one exits.

The faults are injected without touching cai: each process runs a small wrapper
(written to the test's folder and given to ``accelerate launch`` instead of ``-m cai``)
that replaces one function of a stage module in one process, then calls ``cai.cli.main``.
The wrapper also writes down each process's pid and how its ``main`` ended, so the test
sees every process of the launch, not only the launcher. A process with no ``exit``
record was ended by a signal (SIGTERM from the launcher, or our SIGKILL).

Time limits here are hang guards only (300 s); the test asserts on how processes end,
never on how fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HANG_GUARD_S = 300

WRAPPER = r'''
"""cai in one process of an `accelerate launch`, with one injected fault (tests only).

CAI_FAULT = "module:attr|n|rank|action": in process `rank`, the n-th call of module.attr
raises (action "raise") or writes a note and waits there for the test to kill it ("hold").
"""
import importlib
import json
import os
import sys
import time

RANK = int(os.environ.get("RANK", "0"))
NOTES = os.path.join(os.environ["CAI_FAULT_DIR"], f"rank{RANK}.jsonl")


def note(**fields):
    with open(NOTES, "a", encoding="utf-8") as f:
        f.write(json.dumps(fields) + "\n")
        f.flush()
        os.fsync(f.fileno())


def start_time(pid):
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


note(event="start", pid=os.getpid(), ppid=os.getppid(), start=start_time(os.getpid()))


def inject(spec):
    target, at, who, action = spec.split("|")
    if RANK != int(who):
        return
    module, attr = target.split(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(at):
            note(event="fault", action=action, target=target, call=calls[0])
            if action == "raise":
                raise RuntimeError(f"injected fault: call {at} of {target} in process {RANK}")
            while True:  # "hold": the test kills this process (and maybe the launcher) now
                time.sleep(1)
        return original(*args, **kwargs)

    setattr(owner, name, faulty)


if os.environ.get("CAI_FAULT"):
    inject(os.environ["CAI_FAULT"])

from cai.cli import main  # noqa: E402

code = "exception"
try:
    code = main(sys.argv[1:])
finally:
    note(event="exit", code=code)
sys.exit(code)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _notes(faults: Path, rank: int) -> list[dict]:
    path = faults / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def _event(faults: Path, rank: int, event: str) -> dict | None:
    return next((n for n in _notes(faults, rank) if n["event"] == event), None)


def _alive(pid: int, start: int) -> bool:
    """Whether the process ``pid`` that started at ``start`` (clock ticks after boot) still
    runs; a zombie has exited. The start time tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[19]) == start


class Launch:
    """A 2-process ``accelerate launch`` of the wrapper, its output in a file (a process
    left without its launcher keeps the launcher's stdout: a pipe could fill and block it)."""

    def __init__(self, tmp_path: Path, args: list[str], fault: str = ""):
        self.faults = tmp_path / "faults"
        self.faults.mkdir(exist_ok=True)
        wrapper = tmp_path / "cai_with_fault.py"
        wrapper.write_text(WRAPPER, encoding="utf-8")
        self.log_path = tmp_path / "launch.log"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(wrapper), "run", *args]
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, env=_env(CAI_FAULT_DIR=str(self.faults), CAI_FAULT=fault),
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def rank(self, rank: int) -> dict | None:
        return _event(self.faults, rank, "start")

    def wait_for(self, predicate, what: str) -> None:
        end = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < end:
            if predicate():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the launch ended (exit {self.proc.returncode}) before {what}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        pytest.fail(f"no {what} within {HANG_GUARD_S}s:\n{self.log()[-4000:]}")

    def wait_gone(self, rank: int) -> float | None:
        """Seconds until process ``rank`` is gone (None: still alive after the hang guard)."""
        start = self.rank(rank)
        end = time.monotonic() + HANG_GUARD_S
        t0 = time.monotonic()
        while time.monotonic() < end:
            if not _alive(start["pid"], start["start"]):
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def wait_launcher(self) -> int | None:
        try:
            return self.proc.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            return None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def exit_code(self, rank: int):
        """How ``rank``'s ``cai`` main ended: its return code, "exception", or None when
        the process was ended by a signal before it could say."""
        ended = _event(self.faults, rank, "exit")
        return None if ended is None else ended["code"]

    def close(self) -> None:
        """Kill whatever of this launch is still alive: only processes it started, by pid."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for rank in (0, 1):
            start = self.rank(rank)
            if start and _alive(start["pid"], start["start"]):
                os.kill(start["pid"], signal.SIGKILL)
        self._log.close()


@pytest.fixture
def launches():
    made: list[Launch] = []
    yield made
    for launch in made:
        launch.close()


def _data_args(run_dir, tiny_model) -> list[str]:
    return [f"run_dir={run_dir}", f"engine.model={tiny_model}", "engine.device=cpu", "engine.batch_size=8",
            "critique_revision.rounds=1", "critique_revision.max_prompts=6", "critique_revision.max_new_tokens=8",
            "critique_revision.critique_max_new_tokens=4"]


SFT = ["stages=[prepare, critique_revision, sft]", "sft.batch_size=2", "sft.learning_rate=1e-3",
       "sft.dtype=float32", "sft.checkpoint_every=2",
       # the bound on a collective left waiting by a dead peer, below the hang guard
       "dist_timeout_s=120"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tiny_model) -> Path:
    """A run folder with prepare and critique_revision finished (one process): the 2-process
    launches below start at sft."""
    run = tmp_path_factory.mktemp("sft-data") / "run"
    out = subprocess.run([sys.executable, "-m", "cai", "run", *_data_args(run, tiny_model),
                          "stages=[prepare, critique_revision]"],
                         env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    n = len((run / "critique_revision" / "sft" / "train.jsonl").read_text().splitlines())
    assert n >= 8, f"only {n} SFT examples: too few steps to fail in the middle of training"
    return run


def _sft_run(tmp_path, sft_data, tiny_model) -> list[str]:
    shutil.copytree(sft_data, tmp_path / "run")
    return [*_data_args(tmp_path / "run", tiny_model), *SFT]


def _report(launch: Launch) -> str:
    return (f"launcher exit {launch.proc.returncode}; rank 0 {launch.exit_code(0)!r}; "
            f"rank 1 {launch.exit_code(1)!r}\n{launch.log()[-4000:]}")


# -- a non-main process raises inside a distributed training stage -------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("target,at", [
    ("cai.loop:optimizer_step", 2),  # mid-training: process 0 waits in the next gradient all-reduce
    ("cai.stages.sft:STAGE.run", 1),  # at the stage's start: process 0 waits in DDP's first broadcast
])
def test_a_non_main_process_that_raises_in_training_ends_every_process(target, at, tmp_path, tiny_model, sft_data,
                                                                       launches):
    args = _sft_run(tmp_path, sft_data, tiny_model)
    launch = Launch(tmp_path, args, fault=f"{target}|{at}|1|raise")
    launches.append(launch)
    code = launch.wait_launcher()
    assert code is not None, f"the launch still runs after {HANG_GUARD_S}s: {_report(launch)}"
    for rank in (0, 1):
        assert launch.rank(rank) is not None, f"process {rank} never started: {_report(launch)}"
        assert launch.wait_gone(rank) is not None, f"process {rank} still runs: {_report(launch)}"
    assert _event(launch.faults, 1, "fault") is not None, f"the fault was never reached: {_report(launch)}"
    log = launch.log()
    assert "injected fault" in log, _report(launch)

    # Every process ended with a failure: the launcher, the one that raised, and the main one
    # (by its own error, or by the launcher's SIGTERM: then it has no exit record).
    assert code != 0, _report(launch)
    assert launch.exit_code(1) not in (0, None), _report(launch)
    assert launch.exit_code(0) != 0, _report(launch)
    print(f"\n{target} call {at}: launcher exit {code}; process 0 "
          f"{'ended by a signal' if launch.exit_code(0) is None else 'exit ' + repr(launch.exit_code(0))}; "
          f"process 1 exit {launch.exit_code(1)!r}")

    run = tmp_path / "run"
    assert not (run / "sft").exists()  # nothing half-trained was promoted
    assert (run / "critique_revision" / "manifest.json").is_file()  # what finished before is kept

    # The run folder is left resumable: the lock is free and the same command finishes.
    again = subprocess.run([sys.executable, "-m", "cai", "run", *args], env=_env(), capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "[critique_revision] already finished" in again.stdout
    assert json.loads((run / "sft" / "manifest.json").read_text())["status"] == "complete"


# -- kill -9 of the main process -----------------------------------------------------------------


def _kill_main(launch: Launch, with_launcher: bool) -> None:
    """SIGKILL process 0 (held at its fault point), and first the launcher that would stop
    the group, when ``with_launcher``."""
    launch.wait_for(lambda: _event(launch.faults, 0, "fault") is not None, "process 0 at its fault point")
    main, other = launch.rank(0), launch.rank(1)
    assert other is not None and _alive(other["pid"], other["start"]), _report(launch)
    if with_launcher:
        assert main["ppid"] == launch.proc.pid, "process 0 is not the launcher's child: the test would kill a stranger"
        launch.proc.send_signal(signal.SIGKILL)
        launch.proc.wait()
    os.kill(main["pid"], signal.SIGKILL)


def _kill_main_then_wait(launch, launches, with_launcher: bool) -> tuple[float, int]:
    """Kill process 0 with -9 (and the launcher too, ``with_launcher``), then wait, bounded by
    the hang guard, for process 1 and the launcher to be gone: (seconds process 1 took, the
    launcher's exit code). Process 0 never got to say how it ended."""
    launches.append(launch)
    _kill_main(launch, with_launcher)
    waited = launch.wait_gone(1)
    assert waited is not None, f"process 1 still waits {HANG_GUARD_S}s after process 0 was killed: {_report(launch)}"
    code = launch.wait_launcher()
    assert code is not None and code != 0, _report(launch)
    assert launch.exit_code(0) is None
    return waited, code


@pytest.mark.slow
@pytest.mark.parametrize("with_launcher", [False, True], ids=["launcher-alive", "launcher-killed-too"])
def test_kill_9_of_the_main_process_in_a_data_stage_leaves_no_process_waiting(with_launcher, tmp_path, tiny_model,
                                                                               launches):
    """Process 0 generates (critique_revision, a data stage) while process 1 waits for it
    outside the process group (cai.distributed.MainGate). Process 0 is killed with -9 in the
    middle of generation; with the launcher killed too, nobody stops process 1 but itself
    (its wait gives up when process 0's heartbeat is stale: 120 s)."""
    args = [*_data_args(tmp_path / "run", tiny_model), "stages=[prepare, critique_revision]", "dist_timeout_s=120"]
    # clean() is called on every generated answer: its 5th call is in the middle of the first answers
    launch = Launch(tmp_path, args, fault="cai.stages.critique_revision:clean|5|0|hold")
    waited, code = _kill_main_then_wait(launch, launches, with_launcher)
    assert launch.exit_code(1) != 0, _report(launch)
    if with_launcher:
        # nobody signalled process 1: it stopped by itself, with one line naming the silence
        assert launch.exit_code(1) == 2, _report(launch)
        assert "no sign of life" in launch.log(), _report(launch)
    assert not (tmp_path / "run" / "critique_revision").exists()
    print(f"\nlauncher {'killed' if with_launcher else 'alive'}: launcher exit {code}, process 1 gone "
          f"{waited:.0f}s after the kill, its exit {launch.exit_code(1)!r}")


@pytest.mark.slow
@pytest.mark.parametrize("with_launcher", [False, True], ids=["launcher-alive", "launcher-killed-too"])
def test_kill_9_of_the_main_process_in_training_leaves_no_process_waiting(with_launcher, tmp_path, tiny_model, sft_data,
                                                                          launches):
    """Process 0 is killed with -9 between two optimizer steps of sft while process 1 goes
    on to the next step's gradient all-reduce. With the launcher killed too, process 1 must
    end by itself (the collective fails on the lost peer, or at worst after
    ``dist_timeout_s``, 120 s here)."""
    args = _sft_run(tmp_path, sft_data, tiny_model)
    launch = Launch(tmp_path, args, fault="cai.loop:optimizer_step|2|0|hold")
    waited, code = _kill_main_then_wait(launch, launches, with_launcher)
    assert launch.exit_code(1) != 0, _report(launch)
    if with_launcher:
        assert launch.exit_code(1) not in (0, None), _report(launch)  # it ended by itself, with a failure
    assert not (tmp_path / "run" / "sft").exists()
    print(f"\nlauncher {'killed' if with_launcher else 'alive'}: launcher exit {code}, process 1 gone "
          f"{waited:.0f}s after the kill, its exit {launch.exit_code(1)!r}")
