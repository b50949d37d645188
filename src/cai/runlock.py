"""One ``cai run`` per run directory at a time.

The lock is an OS file lock (``flock``) on ``RUN_DIR/.cai.lock``, held for the whole run.
The operating system releases it when the process ends however it ends (kill -9
included), so a lock left by a dead run never blocks anyone; the file itself stays, and
says who held it last. A second run on the same folder stops at once with one line
naming the first run's process. Under ``accelerate launch`` the main process holds it for
every process of that launch.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path

from cai.errors import CaiError

LOCK_NAME = ".cai.lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(fd)
            os.close(fd)
            raise CaiError(
                f"run directory '{self.path.parent}' is in use by another cai run ({holder}); wait for it to "
                "finish, stop it, or use another run_dir"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            info = json.loads(os.read(fd, 4096).decode() or "{}")
            return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
        except (OSError, ValueError):
            return "its process id is not recorded yet"

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
