"""Managed servers (cai.engines.serve) with a stand-in server script: templates, ports,
start-up failures, stopping, and the pid files that find a killed run's orphans.

Every check of a process is by its id through /proc; the real llama.cpp servers are in
tests/test_served_models.py (slow).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.engines import serve
from cai.errors import CaiError

FAKE = Path(__file__).parent / "fixtures" / "fake_openai_server.py"
TEMPLATE = f"{{python}} {FAKE} --port {{port}} --model {{model}} --name {{name}}"


def alive(pid: int) -> bool:
    return serve._alive(pid)


def wait_gone(pids, timeout=15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def group(tmp_path, template=TEMPLATE, replicas=1, model=None, **kw):
    model = model or str(tmp_path)
    values = {"model": model, "gguf": "", "name": "fake", "threads": 1, "parallel": 1, "ctx": 512,
              "ctx_total": 512, "python": sys.executable}
    return serve.ServerGroup(template, values, replicas, tmp_path / "servers", "m", start_timeout_s=30,
                             log=lambda m: None, **kw)


# -- templates ----------------------------------------------------------------------------


def test_builtin_templates_use_known_placeholders():
    for name in serve.TEMPLATES:
        names = serve.check_template(name)
        assert "port" in names and len(names & {"model", "gguf"}) == 1


@pytest.mark.parametrize("template, words", [
    ("llama-serve", "neither a built-in"),
    ("srv --model {model}", "no {port}"),
    ("srv --port {port}", "neither {model}"),
    ("srv --port {port} --model {model} -m {gguf}", "both"),
    ("srv --port {port} --model {model} --x {modle}", "unknown placeholder {modle}"),
    ("srv --port {port --model {model}", "malformed"),
])
def test_bad_templates_are_one_line_errors(template, words):
    with pytest.raises(CaiError) as err:
        serve.check_template(template)
    assert words in str(err.value) and "\n" not in str(err.value) and "engine.serve" in str(err.value)


def test_config_checks_the_template_before_anything_runs():
    from cai.checks import check_config
    from cai.config import load_config

    with pytest.raises(CaiError, match="unknown placeholder"):
        check_config(load_config(None, ["engine.serve=srv --port {port} --model {mdl}"]))
    check_config(load_config(None, ["engine.serve=llama-server", "engine.serve_replicas=2"]))
    with pytest.raises(CaiError, match="serve_replicas"):
        check_config(load_config(None, ["engine.serve=llama-server", "engine.serve_replicas=0"]))


def test_render_keeps_paths_with_spaces_whole_and_finds_the_executable(tmp_path, monkeypatch):
    argv = serve.render("{python} -m x --model {model} --port {port}",
                        {"python": sys.executable, "model": "/a b/c", "port": 5})
    assert argv == [sys.executable, "-m", "x", "--model", "/a b/c", "--port", "5"]
    with pytest.raises(CaiError, match="'no-such-server-binary' was not found"):
        serve.render("no-such-server-binary --port {port}", {"port": 1})
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)  # as on a machine without llama.cpp's server
    with pytest.raises(CaiError, match="cai serve-setup --build-server"):
        serve.render("llama-server --port {port}", {"port": 1})


def test_free_port_is_free():
    port = serve.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing holds it


# -- start and stop -----------------------------------------------------------------------


def test_replicas_start_on_their_own_ports_and_stop(tmp_path):
    g = group(tmp_path, replicas=2).start()
    try:
        pids = g.pids
        assert len(set(pids)) == 2 and all(alive(p) for p in pids)
        assert len({s.port for s in g.servers}) == 2
        records = [json.loads(p.read_text()) for p in (tmp_path / "servers").glob("*.pid.json")]
        assert sorted(r["pid"] for r in records) == sorted(pids)
        assert all(r["start_ticks"] == serve.start_ticks(r["pid"]) and r["argv"] == serve.cmdline(r["pid"])
                   for r in records)
        assert all(os.getpgid(p) == p for p in pids)  # each leads its own group
    finally:
        g.stop()
    assert wait_gone(pids)
    assert not list((tmp_path / "servers").glob("*.pid.json"))
    assert all((tmp_path / "servers" / f"m-{s.port}.log").is_file() for s in g.servers)


def test_a_model_that_is_missing_fails_in_one_line_with_the_log(tmp_path):
    g = group(tmp_path, model=str(tmp_path / "missing.gguf"))
    with pytest.raises(CaiError) as err:
        g.start()
    msg = str(err.value)
    assert "\n" not in msg and "exited with code 1" in msg and "No such file or directory" in msg and ".log" in msg
    assert not list((tmp_path / "servers").glob("*.pid.json"))


def test_a_port_taken_fails_in_one_line_with_the_log(tmp_path, monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        monkeypatch.setattr(serve, "free_port", lambda host=serve.HOST: held.getsockname()[1])
        with pytest.raises(CaiError) as err:
            group(tmp_path).start()
    msg = str(err.value)
    assert "\n" not in msg and "Address already in use" in msg


def test_a_server_that_never_answers_times_out_in_one_line(tmp_path):
    sleeper = "{python} -c 'import time; print(\"loading\", flush=True); time.sleep(60)' {port} {model}"
    g = group(tmp_path, template=sleeper)
    g.start_timeout_s = 1.0
    with pytest.raises(CaiError) as err:
        g.start()
    assert "did not answer /v1/models" in str(err.value) and "loading" in str(err.value)
    assert wait_gone([s.proc.pid for s in g.servers])


# -- orphans ------------------------------------------------------------------------------


def _record(path: Path, proc, owner_pid: int, **change):
    rec = {"pid": proc.pid, "start_ticks": serve.start_ticks(proc.pid), "argv": serve.cmdline(proc.pid), "port": 0,
           "owner": {"pid": owner_pid, "start_ticks": 1, "argv": ["gone"]}}
    rec.update(change)
    path.write_text(json.dumps(rec))


def test_reap_orphans_stops_its_own_and_spares_everyone_else(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "STOP_GRACE_S", 1.0)
    d = tmp_path / "servers"
    d.mkdir()
    spawn = dict(start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    orphan = subprocess.Popen([sys.executable, str(FAKE), "--port", str(serve.free_port()), "--model", str(FAKE),
                               "--ignore-term"], **spawn)
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **spawn)
    same_pid_other_start = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **spawn)
    live_owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **spawn)
    try:
        time.sleep(0.3)
        _record(d / "a.pid.json", orphan, owner_pid=999999999)  # its cai is dead: reaped (SIGTERM ignored: SIGKILL)
        _record(d / "b.pid.json", foreign, owner_pid=999999999, argv=["llama-server", "--port", "1"])  # other command
        _record(d / "c.pid.json", same_pid_other_start, owner_pid=999999999,
                start_ticks=serve.start_ticks(same_pid_other_start.pid) - 1)  # a recycled pid
        (d / "d.pid.json").write_text(json.dumps({  # a live cai's server: left alone, record kept
            "pid": foreign.pid, "start_ticks": serve.start_ticks(foreign.pid), "argv": serve.cmdline(foreign.pid),
            "owner": {"pid": live_owner.pid, "start_ticks": serve.start_ticks(live_owner.pid),
                      "argv": serve.cmdline(live_owner.pid)}}))
        (d / "e.pid.json").write_text("not json")
        stopped = serve.reap_orphans(d, log=lambda m: None)
        assert stopped == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert foreign.poll() is None and same_pid_other_start.poll() is None and live_owner.poll() is None
        assert sorted(p.name for p in d.iterdir()) == ["d.pid.json"]
    finally:
        for p in (orphan, foreign, same_pid_other_start, live_owner):
            p.kill()
            p.wait()


# -- through the pipeline -----------------------------------------------------------------

CR = ["stages=[prepare, critique_revision]", "critique_revision.rounds=1", "critique_revision.max_prompts=3",
      "critique_revision.few_shot=1", "critique_revision.max_new_tokens=8", "critique_revision.critique_max_new_tokens=8",
      "critique_revision.helpful_ratio=0", "critique_revision.quality_gates=false", "engine.wait_for_endpoints_s=2"]


@pytest.fixture
def started(monkeypatch):
    """The pids of every server a test starts, in this process."""
    pids: list[int] = []
    real = serve.ServerGroup.start

    def start(self):
        try:
            return real(self)
        finally:
            pids.extend(self.pids)

    monkeypatch.setattr(serve.ServerGroup, "start", start)
    return pids


def test_a_stage_serves_a_checkpoint_and_stops_its_servers(tmp_path, tiny_model, started):
    from cai.config import load_config
    from cai.pipeline import run_pipeline

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}",
                             f"engine.serve={TEMPLATE}", "engine.serve_replicas=2", *CR])
    run = run_pipeline(cfg, log=lambda m: None)
    chains = [json.loads(x) for x in (run / "critique_revision" / "chains" / "train.jsonl").read_text().splitlines()]
    assert chains and all(c["init_response"] == "Sure, here is a short answer." for c in chains)
    assert len(started) == 2 and wait_gone(started)
    assert not list((run / "servers").glob("*.pid.json")) and len(list((run / "servers").glob("*.log"))) == 2
    # The cache knows the answers by what was served, not where: a rerun on new ports reuses them all.
    import sqlite3

    with sqlite3.connect(run / "cache.sqlite") as db:
        before = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    run_pipeline(cfg, log=lambda m: None, force=True)
    with sqlite3.connect(run / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == before


def test_an_exception_inside_the_stage_stops_its_servers(tmp_path, tiny_model, started, monkeypatch):
    from cai.config import load_config
    from cai.engines.openai import OpenAIEngine
    from cai.pipeline import run_pipeline

    def boom(self, *a, **k):
        raise RuntimeError("boom inside the stage")

    monkeypatch.setattr(OpenAIEngine, "generate", boom)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", f"engine.serve={TEMPLATE}",
                             "engine.cache=false", *CR])
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg, log=lambda m: None)
    assert len(started) == 1 and wait_gone(started)


def _cai_run(tmp_path, tiny_model, template):
    cmd = [sys.executable, "-m", "cai", "run", f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}",
           f"engine.serve={template}", "engine.cache=false", *CR]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a shell that runs the tests in the background
    # (`pytest ... &` from a script) ignores it, the child inherits that, and Python then never
    # turns SIGINT into KeyboardInterrupt (the SIGINT case failed so, run that way)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _server_pid(run_dir: Path, proc, timeout=120) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        for path in (run_dir / "servers").glob("*.pid.json"):
            try:
                return json.loads(path.read_text())["pid"]
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    raise AssertionError(f"no server started: {proc.communicate()[0][-2000:] if proc.poll() is not None else ''}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_stops_the_servers(tmp_path, tiny_model, sig):
    # each completion takes 5 s, so the run (three waves of requests) cannot finish before the
    # signal even when a loaded machine delays this process
    proc = _cai_run(tmp_path, tiny_model, TEMPLATE + " --delay 5")
    pid = _server_pid(tmp_path / "run", proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0, out[-3000:]
    assert wait_gone([pid])
    assert not list((tmp_path / "run" / "servers").glob("*.pid.json"))


def test_kill_9_leaves_an_orphan_that_the_next_run_stops_and_nothing_else(tmp_path, tiny_model, monkeypatch):
    """The stand-in ignores SIGTERM, so the pdeathsig SIGTERM does not stop it either: a
    real orphan. The rerun finds it by its pid file and stops it; a process of someone
    else's (here a sleep) is untouched."""
    monkeypatch.setattr(serve, "STOP_GRACE_S", 1.0)
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    proc = _cai_run(tmp_path, tiny_model, TEMPLATE + " --delay 1 --ignore-term")
    try:
        pid = _server_pid(tmp_path / "run", proc)
        time.sleep(0.5)
        proc.kill()
        proc.wait(timeout=30)
        time.sleep(0.5)
        assert alive(pid)  # the orphan
        from cai.config import load_config
        from cai.pipeline import run_pipeline

        cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}",
                                 "engine.cache=false", "stages=[prepare]"])
        logs = []
        run_pipeline(cfg, log=logs.append)
        assert wait_gone([pid])
        assert any(f"stopped server pid {pid}" in m for m in logs)
        assert foreign.poll() is None
    finally:
        foreign.kill()
        foreign.wait()
        if alive(pid if "pid" in dir() else -1):
            os.kill(pid, signal.SIGKILL)


# -- GGUF export (the converter's plumbing; the real converter runs in test_served_models) --


def test_export_without_the_converter_says_how_to_get_it(tiny_model, monkeypatch):
    from cai.engines.gguf import export_gguf

    monkeypatch.delenv("CAI_LLAMA_CPP_DIR", raising=False)
    with pytest.raises(CaiError) as err:
        export_gguf(tiny_model, "f16", progress=lambda m: None)
    assert "cai serve-setup" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CaiError, match="serve_quant"):
        export_gguf(tiny_model, "q5_k", progress=lambda m: None)


def _fake_converter(folder: Path, body: str) -> None:
    folder.mkdir()
    (folder / "convert_hf_to_gguf.py").write_text(body)


def test_export_runs_once_per_checkpoint_content(tmp_path, tiny_model, monkeypatch):
    """A stand-in converter counts its runs: same content (even in another folder) is one
    export; changed content is another."""
    import shutil

    from cai.engines.gguf import export_gguf

    calls = tmp_path / "calls"
    _fake_converter(tmp_path / "llama.cpp", (
        "import sys, pathlib\n"
        f"open({str(calls)!r}, 'a').write(sys.argv[1] + '\\n')\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--outfile') + 1])\n"
        "out.write_bytes(b'GGUF' + pathlib.Path(sys.argv[1], 'config.json').read_bytes())\n"))
    monkeypatch.setenv("CAI_LLAMA_CPP_DIR", str(tmp_path / "llama.cpp"))
    first = export_gguf(tiny_model, "f16", progress=lambda m: None)
    copy = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    assert export_gguf(copy, "f16", progress=lambda m: None) == first
    assert len(calls.read_text().splitlines()) == 1
    (copy / "generation_config.json").write_text('{"changed": true}')
    assert export_gguf(copy, "f16", progress=lambda m: None) != first
    assert len(calls.read_text().splitlines()) == 2
    assert first.read_bytes().startswith(b"GGUF") and not list(first.parent.glob("*.tmp"))


def test_a_converter_missing_a_package_names_it(tmp_path, tiny_model, monkeypatch):
    from cai.engines.gguf import export_gguf

    _fake_converter(tmp_path / "llama.cpp", "import sentencepiece_not_installed_here\n")
    monkeypatch.setenv("CAI_LLAMA_CPP_DIR", str(tmp_path / "llama.cpp"))
    with pytest.raises(CaiError) as err:
        export_gguf(tiny_model, "q8_0", progress=lambda m: None)
    assert "pip install sentencepiece_not_installed_here" in str(err.value) and "\n" not in str(err.value)
