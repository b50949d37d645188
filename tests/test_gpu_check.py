"""The GPU check (``benchmarks/gpu_check.py``) rehearsed on the CPU with the tiny shape.

The script is prepared for a GPU machine it has not met yet; this runs it end to end on
the CPU (the conftest-sized model, float32) in a subprocess, as it will run there, and
reads its JSON. About 35 s on 2 quiet cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STAGES = ["prepare", "critique_revision", "sft", "feedback", "preference_model", "rl", "dpo"]
TRAINING = ["sft", "preference_model", "rl", "dpo"]
#: The lora run copies these two from the full run (same config): they are not phases of their own.
LORA_STAGES = ["sft", "feedback", "preference_model", "rl", "dpo"]


def test_cpu_run_of_the_gpu_check_passes_every_phase_with_sensible_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    # One thread: the tiny model gains nothing from two, and on a shared 2-core machine two
    # threads per process waiting on each other make the run several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--budget-s", "600", "--out", str(out),
         "--scratch", str(tmp_path / "scratch")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.is_file(), done.stderr[-4000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    failed = {name: p.get("error") or p.get("reason") for name, p in phases.items() if p["status"] != "ok"}
    assert not failed, failed
    assert done.returncode == 0, done.stderr[-4000:]
    assert report["all_ok"] is True

    want = (["imports", "build_model", "config", "plan", "validate", "generate"]
            + [f"full/{s}" for s in STAGES] + [f"lora/{s}" for s in LORA_STAGES])
    assert list(phases) == want

    assert report["shape"] == "tiny" and report["device"]["kind"] == "cpu"
    assert report["versions"]["torch"] and report["versions"]["peft"]
    assert 0 < report["wall_seconds"] < 600
    assert "RSS" in report["memory_measure"] or "resident" in report["memory_measure"]

    model = phases["build_model"]
    assert model["parameters"] > 0 and model["saved_bytes"] > 0 and model["config"]["num_hidden_layers"] == 2

    for method in ("full", "lora"):
        rows = {r["stage"]: r for r in phases["plan"]["plans"][method]["rows"]}
        assert list(rows) == STAGES
        for stage in TRAINING:
            assert rows[stage]["memory"]["stage_bytes"] > 0, (method, stage)
            assert rows[stage]["steps"] == 2, (method, stage)

    validate = phases["validate"]
    assert validate["exit_code"] == 0 and validate["lines"]
    assert validate["command"][:4] == ["python", "-m", "cai", "validate"]

    gen = phases["generate"]
    assert gen["batch"]["rows"] == 8 and gen["batch"]["new_tokens"] > 0 and gen["new_tokens_per_s"] > 0
    assert gen["one_row"]["new_tokens"] > 0

    for name in want[6:]:
        row = phases[name]
        assert row["stage_seconds"] > 0, name
        assert row["counts"], name
        assert row["memory"]["peak_bytes"] > 0, name
        stage = name.split("/", 1)[1]
        if stage in TRAINING:
            assert row["counts"]["steps"] == 2, name
    assert phases["full/sft"]["tokens_per_s"]["train_tokens_per_s"] > 0
    assert phases["lora/sft"]["tokens_per_s"]["train_tokens_per_s"] > 0
    assert phases["full/rl"]["tokens_per_s"]["rollout_tokens"] > 0

    table = {(r["run"], r["stage"]): r for r in report["comparison"]}
    assert set(table) == {tuple(n.split("/", 1)) for n in want[6:]}
    for (method, stage), r in table.items():
        assert r["status"] == "ok"
        assert r["measured_memory_bytes"] is not None and r["measured_memory_bytes"] >= 0
        if stage in TRAINING:
            assert r["plan_memory_bytes"] > 0, (method, stage)
            assert r["plan_steps"] == r["steps"] == 2, (method, stage)
    assert "all phases ok" in done.stdout
