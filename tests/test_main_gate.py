"""cai.distributed.MainGate: the other processes wait for the main process's work by file,
outside the process group (threads stand in for processes here)."""

import threading
import time

import pytest

from cai import distributed
from cai.distributed import MainGate
from cai.errors import CaiError


class _State:
    def __init__(self, barrier, main):
        self.barrier, self.is_main_process = barrier, main

    def wait_for_everyone(self):
        self.barrier.wait(timeout=30)


def _pair(tmp_path, main_fn, other_fn, stale_s=30.0):
    barrier, out = threading.Barrier(2), {}

    def proc(main, fn):
        try:
            gate = MainGate(_State(barrier, main), tmp_path, "tok", stale_s=stale_s)
            out[main] = fn(gate)
            gate.close()
        except BaseException as exc:  # noqa: BLE001
            out[main] = exc

    threads = [threading.Thread(target=proc, args=(m, f)) for m, f in ((True, main_fn), (False, other_fn))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_the_other_process_gets_the_main_result_after_a_long_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "POLL_S", 0.01)

    def slow():
        time.sleep(0.5)
        return {"rows": 3}

    out = _pair(tmp_path, lambda g: [g.run(slow), g.run(lambda: {"n": 2})],
                lambda g: [g.run(lambda: pytest.fail("runs on main only")), g.run(lambda: {})])
    assert out[True] == out[False] == [{"rows": 3}, {"n": 2}]
    assert not (tmp_path / ".cai-dist").exists()


def test_an_error_on_the_main_process_ends_the_other_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "POLL_S", 0.01)

    def boom():
        raise ValueError("disk full")

    out = _pair(tmp_path, lambda g: g.run(boom), lambda g: g.run(lambda: {}))
    assert isinstance(out[True], ValueError)
    assert isinstance(out[False], CaiError) and "ValueError: disk full" in str(out[False])


def test_a_silent_main_process_is_given_up_on(tmp_path, monkeypatch):
    """A main process killed outside a launcher that stops the group: its heartbeat goes
    stale and the other process stops with one line instead of waiting for ever."""
    monkeypatch.setattr(distributed, "POLL_S", 0.01)
    monkeypatch.setattr(distributed, "HEARTBEAT_S", 60.0)  # the heartbeat thread stays silent

    def main(gate):
        time.sleep(1.5)  # "killed": never writes a result
        return "gone"

    out = _pair(tmp_path, main, lambda g: g.run(lambda: {}), stale_s=0.5)
    assert isinstance(out[False], CaiError) and "no sign of life" in str(out[False])
