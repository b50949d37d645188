"""Managed servers: cai starts a serving engine for a model, routes requests to it through
the OpenAI engine, and stops it again.

``engine.serve`` names a command template, a built-in one (:data:`TEMPLATES`) or a
command line of your own with placeholders::

    vllm serve {model} --host {host} --port {port} --served-model-name {name}

``{model}`` is the transformers checkpoint folder; ``{gguf}`` is that checkpoint exported
to GGUF (:mod:`cai.engines.gguf`) at ``engine.serve_quant``. A template uses one of them.
cai picks a free loopback port per replica, starts ``engine.serve_replicas`` servers in
their own process groups (their logs in ``<server dir>/<label>-<port>.log``), waits for
``/v1/models`` to answer, and hands the URLs to :class:`~cai.engines.openai.OpenAIEngine`
with its balancing and failover.

Stopping. The servers stop when the engine is closed (the pipeline closes served engines
at the end of every stage, whether it finished or raised), at interpreter exit, on SIGTERM
(turned into ``SystemExit`` so ``finally`` blocks run) and on SIGINT (``KeyboardInterrupt``).
Each server also gets ``PR_SET_PDEATHSIG`` (SIGTERM when cai dies, on Linux). For what
still survives a ``kill -9`` (a server's own child processes, or a platform without
pdeathsig), each server has a pid file beside its log: its pid, its start time from
``/proc`` and its command line. :func:`reap_orphans` (run at the start of every ``cai run``,
under the run directory's lock) stops a recorded process only when all three still match,
so a recycled pid belonging to someone else is never touched.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from cai.engines.openai import OpenAIEngine
from cai.errors import CaiError

HOST = "127.0.0.1"

#: Built-in command templates. ``llama-server`` is llama.cpp's C++ server with parallel
#: slots and continuous batching; ``llama-cpp-python`` is the Python server of the
#: ``llama-cpp-python[server]`` package (one request at a time per server); ``vllm`` is
#: vLLM's OpenAI server (GPUs).
TEMPLATES = {
    "llama-server": (
        "llama-server --model {gguf} --host {host} --port {port} --alias {name} --threads {threads} "
        "--parallel {parallel} --ctx-size {ctx_total} --no-webui"
    ),
    "llama-cpp-python": (
        "{python} -m llama_cpp.server --model {gguf} --host {host} --port {port} --model_alias {name} "
        "--n_threads {threads} --n_ctx {ctx}"
    ),
    "vllm": (
        "vllm serve {model} --host {host} --port {port} --served-model-name {name} --max-model-len {ctx} "
        "--max-logprobs 20 --disable-log-requests"
    ),
}
PLACEHOLDERS = ("model", "gguf", "host", "port", "name", "threads", "parallel", "ctx", "ctx_total", "python")
FIELD = "engine.serve"
#: Seconds a server gets to exit after SIGTERM before it is sent SIGKILL.
STOP_GRACE_S = 10.0


# -- templates ----------------------------------------------------------------------------


def template_text(serve: str) -> str:
    """The command template ``engine.serve`` stands for (a built-in name or the template)."""
    return TEMPLATES.get(serve, serve)


def placeholders(template: str) -> set[str]:
    """The ``{names}`` a template uses; a malformed or unknown one is a one-line error."""
    try:
        names = {f for _, f, spec, conv in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise CaiError(f"config field '{FIELD}': template '{template}' is malformed ({exc}); "
                       "write placeholders as {port}, and a literal brace as {{ or }}") from None
    unknown = sorted(n for n in names if n not in PLACEHOLDERS)
    if unknown:
        raise CaiError(f"config field '{FIELD}': unknown placeholder {{{unknown[0]}}} in '{template}'; "
                       f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    return names


def check_template(serve: str) -> set[str]:
    """Check ``engine.serve`` without starting anything: its placeholders."""
    if serve in TEMPLATES:
        return placeholders(TEMPLATES[serve])
    if not serve.strip() or "{" not in serve:
        raise CaiError(f"config field '{FIELD}': '{serve}' is neither a built-in template "
                       f"({', '.join(TEMPLATES)}) nor a command with {{port}} and {{model}} or {{gguf}}")
    names = placeholders(serve)
    if "port" not in names:
        raise CaiError(f"config field '{FIELD}': the template '{serve}' has no {{port}}; cai picks the port")
    if not names & {"model", "gguf"}:
        raise CaiError(f"config field '{FIELD}': the template '{serve}' has neither {{model}} (a transformers "
                       "folder) nor {{gguf}} (the GGUF export)")
    if {"model", "gguf"} <= names:
        raise CaiError(f"config field '{FIELD}': the template '{serve}' has both {{model}} and {{gguf}}; use one")
    return names


def render(template: str, values: dict) -> list[str]:
    """The argv of a template: split like a shell would, then each word filled in (so a
    path with spaces stays one argument)."""
    placeholders(template)
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise CaiError(f"config field '{FIELD}': cannot split '{template}' into words ({exc})") from None
    argv = [w.format_map(values) for w in words]
    exe = argv[0]
    found = shutil.which(exe) or _bundled(exe)
    if found is None:
        hint = {"llama-server": "run `cai serve-setup --build-server` (builds llama.cpp's server from the "
                                "llama-cpp-python source package) or put llama-server on PATH",
                "vllm": "pip install vllm (GPU machines)"}.get(Path(exe).name, "install it or fix the template")
        raise CaiError(f"config field '{FIELD}': the command '{exe}' was not found; {hint}")
    argv[0] = found
    return argv


def _bundled(exe: str) -> str | None:
    """A llama.cpp binary that ``cai serve-setup --build-server`` built into the cache."""
    from cai.engines.gguf import tools_dir

    path = tools_dir() / "bin" / exe
    return str(path) if "/" not in exe and path.is_file() and os.access(path, os.X_OK) else None


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the OS's choice); the server binds it moments later."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- process records ----------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    or None when there is no such process. A pid the OS recycles gets another start time."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    rest = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a] or None


def same_process(record: dict) -> bool:
    """Is the process a pid file records still that very process (pid, start time and
    command line all match)?"""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        return False
    return start_ticks(pid) == record.get("start_ticks") and cmdline(pid) == record.get("argv")


def _alive(pid: int) -> bool:
    return start_ticks(pid) is not None and _state(pid) != "Z"


def _state(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        return raw[raw.rfind(b")") + 2:].split()[0].decode()
    except (OSError, IndexError):
        return ""


def _kill_group(pid: int, grace_s: float | None = None) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``grace_s``."""
    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace_s
    while time.monotonic() < end and _alive(pid):
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def reap_orphans(server_dir: Path, log: Callable[[str], None] = print) -> list[int]:
    """Stop the servers an earlier cai process recorded in ``server_dir`` and left running
    (it was killed with SIGKILL); return their pids. A record whose owner is still alive
    is left alone (another cai, e.g. ``cai chat``, still uses it), and so is any process
    that no longer matches its record's start time and command line."""
    stopped = []
    for path in sorted(Path(server_dir).glob("*.pid.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        owner = record.get("owner", {})
        if owner.get("pid") != os.getpid() and same_process(owner):
            continue  # its cai is still running
        if same_process(record):
            pid = record["pid"]
            try:
                leads_group = os.getpgid(pid) == pid
            except ProcessLookupError:
                leads_group = False
            if leads_group:
                _kill_group(pid)
            else:
                os.kill(pid, signal.SIGKILL)
            stopped.append(pid)
            log(f"stopped server pid {pid} (port {record.get('port')}) that an interrupted cai run left running")
        path.unlink(missing_ok=True)
    return stopped


# -- servers ------------------------------------------------------------------------------


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this server when the cai process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def log_tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a server log, joined into one line."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept) if kept else "(empty log)"


class Server:
    """One started server process, its port, log and pid file."""

    def __init__(self, argv: list[str], port: int, log_path: Path, pid_path: Path, env: dict | None = None):
        self.argv, self.port, self.log_path, self.pid_path = argv, port, log_path, pid_path
        self.url = f"http://{HOST}:{port}/v1"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: stopped as a whole, spared the terminal's ^C
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
            )
        record = {
            "pid": self.proc.pid, "start_ticks": start_ticks(self.proc.pid), "argv": cmdline(self.proc.pid) or argv,
            "port": port, "log": str(log_path),
            "owner": {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid()), "argv": cmdline(os.getpid())},
        }
        tmp = pid_path.with_name(pid_path.name + ".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, pid_path)

    def ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
            conn.request("GET", "/v1/models")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except (OSError, http.client.HTTPException):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc.pid)
        else:
            try:  # the leader is gone; its group may not be
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
            pass
        self.pid_path.unlink(missing_ok=True)


_LIVE: set["ServerGroup"] = set()
_LIVE_LOCK = threading.Lock()
_HOOKED = False


def _stop_all() -> None:
    with _LIVE_LOCK:
        groups = list(_LIVE)
    for g in groups:
        g.stop()


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess test
    raise SystemExit(128 + signum)


def _hook_exit() -> None:
    """Once per process: stop every live server at exit, and turn SIGTERM (where nobody
    else handles it) into SystemExit so the stage's ``finally`` blocks stop them first."""
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


class ServerGroup:
    """``replicas`` servers of one model, started together and stopped together."""

    def __init__(self, template: str, values: dict, replicas: int, server_dir: Path, label: str,
                 start_timeout_s: float = 300.0, log: Callable[[str], None] = print, env: dict | None = None):
        self.template, self.values, self.replicas = template, dict(values), replicas
        self.server_dir, self.label, self.start_timeout_s, self.log = Path(server_dir), label, start_timeout_s, log
        self.env = env
        self.servers: list[Server] = []

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers]

    def start(self) -> "ServerGroup":
        _hook_exit()
        self.server_dir.mkdir(parents=True, exist_ok=True)
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            for _ in range(self.replicas):
                port = free_port()
                argv = render(self.template, {**self.values, "host": HOST, "port": port})
                self.servers.append(Server(argv, port, self.server_dir / f"{self.label}-{port}.log",
                                           self.server_dir / f"{self.label}-{port}.pid.json", self.env))
            self._wait()
        except BaseException:
            self.stop()
            raise
        self.log(f"engine: serving {self.label} with {len(self.servers)} server(s) at "
                 + ", ".join(self.urls) + f" (logs in {self.server_dir})")
        return self

    def _wait(self) -> None:
        end = time.monotonic() + self.start_timeout_s
        waiting = list(self.servers)
        while waiting:
            for s in list(waiting):
                code = s.proc.poll()
                if code is not None:
                    raise CaiError(
                        f"{FIELD}: the server for {self.label} ({Path(s.argv[0]).name}, port {s.port}) exited with "
                        f"code {code} before it was ready; log {s.log_path}: {log_tail(s.log_path)}"
                    )
                if s.ready():
                    waiting.remove(s)
            if waiting and time.monotonic() > end:
                s = waiting[0]
                raise CaiError(
                    f"{FIELD}: the server for {self.label} (port {s.port}) did not answer /v1/models within "
                    f"engine.serve_start_timeout_s={self.start_timeout_s:g}; log {s.log_path}: {log_tail(s.log_path)}"
                )
            if waiting:
                time.sleep(0.2)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        with _LIVE_LOCK:
            _LIVE.discard(self)


def serve_values(cfg, model_dir: str, gguf: str | None, name: str) -> dict:
    """The placeholder values of a config (everything but host and port)."""
    replicas = max(1, cfg.serve_replicas)
    threads = cfg.serve_threads or max(1, (os.cpu_count() or 1) // replicas)
    return {
        "model": model_dir, "gguf": gguf or "", "name": name, "threads": threads, "parallel": cfg.serve_parallel,
        "ctx": cfg.serve_ctx, "ctx_total": cfg.serve_ctx * cfg.serve_parallel, "python": sys.executable,
    }


def wants_server(cfg, path: str) -> bool:
    """Does a model get a managed server? With ``engine.serve`` set: every model cai has as
    a folder (the default model, a local checkpoint, one this run trained); a model name
    under kind=openai stays on the user's endpoints."""
    if cfg.serve == "none":
        return False
    return cfg.kind == "local" or Path(path).is_dir()


def build_served_engine(cfg, model: str, server_dir: Path, progress: Callable[[str], None] = print):
    """An OpenAI engine on managed servers for ``model`` (a setting: 'default', a folder
    or hub id); closing it stops the servers."""
    from transformers import AutoTokenizer

    from cai.engines.gguf import checkpoint_hash, export_gguf, file_hash
    from cai.models import resolve_model

    names = check_template(cfg.serve)
    path = resolve_model(model, cfg.revision, progress=progress)
    if not Path(path).is_dir():
        raise CaiError(f"{FIELD}: model '{model}' is not a local folder; serve it yourself and use engine.kind=openai")
    if "gguf" in names:
        gguf = export_gguf(path, cfg.serve_quant, progress=progress)
        ident = f"gguf:{file_hash(gguf)[:16]}:{cfg.serve_quant}"
    else:
        gguf, ident = None, f"hf:{checkpoint_hash(path)[:16]}"
    name = "cai-" + ident.replace(":", "-")
    label = f"{Path(path).parent.name}-{Path(path).name}"[-48:].replace("/", "_")
    group = ServerGroup(template_text(cfg.serve), serve_values(cfg, path, str(gguf) if gguf else None, name),
                        max(1, cfg.serve_replicas), server_dir, label, cfg.serve_start_timeout_s, progress,
                        env={**os.environ, "OMP_NUM_THREADS": str(serve_values(cfg, path, None, name)["threads"])})
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    group.start()
    try:
        engine = ServedEngine(
            group, group.urls, name, tokenizer=tok, tokenizer_name=path, max_concurrency=cfg.max_concurrency,
            timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, top_logprobs=cfg.top_logprobs,
            wait_for_endpoints_s=cfg.wait_for_endpoints_s,
            # llama.cpp's samplers: no repetition penalty (llama-cpp-python's server defaults to 1.1),
            # as in the local engine; other servers get only standard fields.
            extra_body={"repeat_penalty": 1.0} if gguf else None,
        )
    except BaseException:
        group.stop()
        raise
    # The cache's identity: what is served (content hash and type), never where (the port).
    engine.identity = f"served:{ident}:top{cfg.top_logprobs}"
    return engine


class ServedEngine(OpenAIEngine):
    """An OpenAI engine whose servers cai started; ``close`` stops them."""

    served = True

    def __init__(self, group: ServerGroup, urls: Sequence[str], model: str, **kw):
        super().__init__(urls, model, **kw)
        self.group = group

    def __repr__(self) -> str:
        return f"ServedEngine({self.group.label}, {self.group.urls})"

    def close(self) -> None:
        self.group.stop()
