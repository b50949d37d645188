"""`cai validate` as the cluster pre-flight: one line per check, ok / warn / error.

The device checks read ``cai.checks.visible_devices``; here, on machines without a GPU,
the tests that need one replace it with fakes (their names say so). Only a GPU machine
runs them for real: benchmarks/gpu_check.py.
"""

from __future__ import annotations

import pytest

from cai import checks
from cai.checks import ERROR, OK, WARN, Device
from cai.cli import main
from cai.config import load_config

from test_openai_engine import Stub  # noqa: E402  (the same stub server)

GiB = 2**30


def _validate(capsys, *argv) -> tuple[int, list[str], str]:
    rc = main(["validate", *argv])
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err


def _status(lines: list[str], name: str) -> str:
    found = [line for line in lines if line.split(": ", 2)[1:2] == [name]]
    assert found, (name, lines)
    return found[0].split(":")[0]


def test_a_gpu_config_on_a_cpu_machine_warns_what_it_cannot_check(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(checks, "visible_devices", lambda: [])
    rc, lines, err = _validate(capsys, "--config", "gpu-vllm", f"run_dir={tmp_path / 'run'}")
    assert rc == 0, err
    assert _status(lines, "devices") == WARN and "no CUDA device is visible here" in "\n".join(lines)
    assert _status(lines, "serving") in (WARN, OK)  # vllm is not installed on the CPU machines here
    assert any(line.startswith("warn: models: cannot check sft.model=") for line in lines)  # not skipped any more
    assert lines[-1].startswith("pre-flight passed with")
    rc, lines, err = _validate(capsys, "--config", "gpu-vllm", f"run_dir={tmp_path / 'run'}", "--strict")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: pre-flight (--strict") and "devices:" in err


def test_the_device_checks_with_faked_gpus(monkeypatch):
    cfg = load_config("gpu-vllm", ["sft.model=default", "preference_model.model=default", "rl.policy=default",
                                   "dpo.policy=default"])
    two = [Device("FAKE H100", 80 * GiB, 79 * GiB), Device("FAKE H100", 80 * GiB, 79 * GiB)]
    assert checks.check_devices(cfg, two).status == OK
    gone = load_config("gpu-vllm", ["engine.device=cuda:3"])
    assert checks.check_devices(gone, two).status == ERROR
    rows = [{"stage": "sft", "memory": {"stage_bytes": 30 * GiB}, "train_tokens": 1, "saves": 1}]
    assert checks.check_memory_fit(cfg, rows, two, 1).status == OK
    small = [Device("FAKE T4", 16 * GiB, 15 * GiB)]
    fit = checks.check_memory_fit(cfg, rows, small, 1)
    assert fit.status == ERROR and "but the GPU has 15.0 GiB" in fit.message
    assert checks.check_processes(cfg, two, 2).status == OK
    crowded = checks.check_processes(cfg, two, 4)
    assert crowded.status == ERROR and "4 processes but 2 CUDA device(s)" in crowded.message
    assert checks.check_processes(cfg, [], 4).status == WARN  # a login node: nothing to count against


def test_serving_engine_missing_is_an_error_where_the_run_would_run_with_faked_gpus(monkeypatch):
    import importlib.util

    cfg = load_config("gpu-vllm")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setattr(checks, "visible_devices", lambda: [Device("FAKE H100", 80 * GiB, 79 * GiB)])
    check = checks.check_serving(cfg)
    assert check.status == ERROR and "pip install vllm" in check.message
    monkeypatch.setattr(checks, "visible_devices", lambda: [])
    assert checks.check_serving(cfg).status == WARN  # a login node: it may be installed on the GPU nodes only


def test_endpoints_answer_serve_the_name_and_hold_the_longest_request():
    stub = Stub(lambda *a: (200, {}))
    try:
        cfg = load_config(None, ["engine.kind=openai", "engine.model=m", f"engine.endpoints=[{stub.url}]",
                                 "sft.model=default"])
        stub.models = {"data": [{"id": "m", "max_model_len": 4096}]}
        (ok,) = checks.check_endpoints(cfg, longest=3000)
        assert ok.status == OK and "context 4096" in ok.message
        (short,) = checks.check_endpoints(cfg, longest=5000)
        assert short.status == ERROR and "context of 4096 tokens" in short.message
        stub.models = {"data": [{"id": "other"}]}
        (wrong,) = checks.check_endpoints(cfg, longest=10)
        assert wrong.status == ERROR and "does not serve 'm' (it serves other)" in wrong.message
    finally:
        stub.close()
    (dead,) = checks.check_endpoints(cfg, longest=10, timeout_s=2)  # the stub is gone: nothing listens there
    assert dead.status == ERROR and "no answer at /v1/models" in dead.message


def test_an_uncached_hub_model_offline_is_one_warning_without_retries(monkeypatch):
    from cai import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda *a: pytest.fail("offline: the hub must not be asked"))
    cfg = load_config(None, ["sft.model=nobody/no-such-model", "evaluate.judge=nobody/judge"])
    out = checks.check_models(cfg)
    assert [c.status for c in out] == [WARN] and "sft.model=nobody/no-such-model" in out[0].message


def test_a_hub_model_with_no_network_fails_the_run_at_once_in_one_line(monkeypatch, capsys, tmp_path):
    from cai import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda *a: False)
    monkeypatch.setattr(models, "offline", lambda: False)
    rc = main(["run", f"run_dir={tmp_path / 'run'}", "engine.model=nobody/no-such-model", "stages=[prepare]"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be reached from here" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_not_enough_disk_is_an_error(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10 * GiB, 10 * GiB - 1024, 1024))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    rows = [{"stage": "sft", "disk_bytes": 2 * GiB, "memory": {"stage_bytes": 1}, "train_tokens": 1}]
    check = checks.check_disk(cfg, rows)
    assert check.status == ERROR and "2.0 GiB" in check.message
    assert checks.check_disk(cfg, [{**rows[0], "disk_bytes": 512}]).status == OK


def test_the_plan_gives_disk_bytes_for_every_training_stage():
    from cai.plan import counter, estimate

    rows = {r["stage"]: r for r in estimate(load_config("cpu-tiny"), counter(None))}
    for stage in ("sft", "preference_model", "rl", "dpo"):
        assert rows[stage]["disk_bytes"] > 100 * 2**20, stage  # at least the saved 135M model
    assert rows["critique_revision"]["disk_bytes"] > 0  # its request cache and data files


def test_a_training_calibration_taken_beside_other_work_is_not_cached(tmp_path, monkeypatch, tiny_model):
    """The plan's training calibration records how busy the cores were; one that other
    processes starved is used once and not cached, and --recalibrate measures again."""
    from cai import plan as plan_mod

    cfg = load_config(None, [f"engine.model={tiny_model}", "engine.device=cpu", "sft.batch_size=2",
                             "sft.max_length=32"])
    cache = tmp_path / "cai-cache" / "plan"
    said: list[str] = []
    monkeypatch.setattr(plan_mod, "cores_busy", lambda wall, cpu: 0.1)  # as if another job held the cores
    starved = plan_mod.measure_training(cfg, log=said.append)
    assert starved["busy"] and starved["cores_busy"] == 0.1 and not starved["cached"]
    assert not list(cache.glob("*.json")) and any("not cached" in m for m in said)
    monkeypatch.setattr(plan_mod, "cores_busy", lambda wall, cpu: float(plan_mod.usable_cores()))
    quiet = plan_mod.measure_training(cfg, log=said.append)
    assert not quiet.get("busy") and len(list(cache.glob("*.json"))) == 1
    assert plan_mod.measure_training(cfg, log=said.append)["cached"] is True
    assert plan_mod.measure_training(cfg, log=said.append, recalibrate=True)["cached"] is False
