"""Sharded training (FSDP2 on a gloo mesh, 2 CPU processes) saves whole models and resumes.

``sft.sharding=fsdp`` / ``dpo.sharding=fsdp`` shard each decoder layer and the whole model
with ``torch.distributed.fsdp.fully_shard``; the saved ``model/`` is an ordinary
``save_pretrained`` folder (the shards gathered on the main process) and a checkpoint holds
whole tensors, so a killed run resumes from it. Both are checked against one unsharded
process: the same data, batches and losses give the same weights up to float summation order.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

DATA = ["engine.device=cpu", "engine.batch_size=8", "critique_revision.rounds=1", "critique_revision.max_prompts=6",
        "critique_revision.max_new_tokens=8", "critique_revision.critique_max_new_tokens=4",
        "feedback.max_prompts=6", "feedback.max_new_tokens=6"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(n: int, args: list[str]) -> list[str]:
    if n == 1:
        return [sys.executable, "-m", "cai", "run", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "cai", "run", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(n: int, args: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(_cmd(n, args), env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (n, out.stdout[-2000:] + out.stderr[-3000:])
    return out


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _close(w1, w2, start, what):
    assert w1.keys() == w2.keys(), (what, set(w1) ^ set(w2))
    moved = max(float((w1[k] - start.get(k, w1[k])).abs().max()) for k in w1)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    off = sum(int(((w1[k] - w2[k]).abs() > 1e-5).sum()) for k in w1) / sum(w1[k].numel() for k in w1)
    print(f"{what}: max |weight difference| {diff:.2e}, share over 1e-5 {off:.2e}, max update {moved:.2e}")
    # as in test_distributed: AdamW turns float noise in near-zero gradients into a visible step on a few weights
    assert moved > 1e-4 and off < 2e-3 and diff < max(1e-4, 0.25 * moved), what


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, tiny_model):
    """prepare -> critique_revision -> feedback once, copied into each test's run folders."""
    run = tmp_path_factory.mktemp("sharding") / "data"
    _run(1, [f"run_dir={run}", f"engine.model={tiny_model}", f"feedback.policy={tiny_model}", *DATA,
             "stages=[prepare, critique_revision, feedback]"])
    return run


def _train_args(run, tiny_model, sharding: str, **extra) -> list[str]:
    args = [f"run_dir={run}", f"engine.model={tiny_model}", f"feedback.policy={tiny_model}", *DATA,
            "stages=[prepare, critique_revision, feedback, sft, dpo]", "sft.batch_size=4", "sft.learning_rate=1e-3",
            "sft.dtype=float32", f"sft.sharding={sharding}", f"dpo.policy={tiny_model}", "dpo.batch_size=4",
            "dpo.learning_rate=1e-3", "dpo.dtype=float32", "dpo.soft_labels=false", f"dpo.sharding={sharding}",
            "sft.checkpoint_every=1", "dpo.checkpoint_every=1"]
    return args + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


@pytest.mark.slow
def test_fsdp_two_processes_save_whole_models_matching_one_process(tmp_path, tiny_model, data_run):
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(data_run, tmp_path / "one")
    shutil.copytree(data_run, tmp_path / "two")
    _run(1, _train_args(tmp_path / "one", tiny_model, "none"))
    two = _run(2, _train_args(tmp_path / "two", tiny_model, "fsdp"))
    assert two.stdout.count("sharded with FSDP2 over 2 processes") == 2, two.stdout[-3000:]  # sft and dpo
    start = _weights_of(tiny_model)
    for stage in ("sft", "dpo"):
        folder = tmp_path / "two" / stage / "model"
        _close(_weights(tmp_path / "one" / stage / "model"), _weights(folder), start, stage)
        AutoModelForCausalLM.from_pretrained(folder)  # an ordinary save_pretrained folder
        assert json.loads((folder / "cai_training.json").read_text())["config"]["sharding"] == "fsdp"
        assert not (tmp_path / "two" / f"{stage}.partial").exists()
    m1 = json.loads((tmp_path / "one" / "dpo" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "dpo" / "metrics.json").read_text())
    for a, b in zip(m1["history"], m2["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.slow
def test_fsdp_run_killed_mid_training_resumes_from_its_checkpoint(tmp_path, tiny_model, data_run):
    """Kill -9 a 2-process sharded sft after its first checkpoint; the rerun resumes there
    and ends with the weights of an uninterrupted unsharded run."""
    import shutil

    shutil.copytree(data_run, tmp_path / "one")
    shutil.copytree(data_run, tmp_path / "two")
    longer = {"sft__batch_size": 2, "sft__epochs": 6, "sft__checkpoint_every": 3, "stages": "[prepare, "
              "critique_revision, feedback, sft]"}
    _run(1, _train_args(tmp_path / "one", tiny_model, "none", **longer))
    args = _train_args(tmp_path / "two", tiny_model, "fsdp", **longer)
    proc = subprocess.Popen(_cmd(2, args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state = tmp_path / "two" / "sft.partial" / "checkpoint" / "trainer_state.json"
    end = time.time() + 600
    while time.time() < end and proc.poll() is None and not state.is_file():
        time.sleep(0.05)
    killed = proc.poll() is None
    # the launcher and every worker it started (torchrun may start them in sessions of their own)
    psutil = pytest.importorskip("psutil", reason="the RSS check needs psutil: pip install psutil")

    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    assert killed and state.is_file(), "the sharded run finished (or failed) before its first checkpoint"
    step = json.loads(state.read_text())["step"]
    rerun = _run(2, args)
    assert f"[sft] resuming from checkpoint at step {step}/36" in rerun.stdout, rerun.stdout[-3000:]
    _close(_weights(tmp_path / "one" / "sft" / "model"), _weights(tmp_path / "two" / "sft" / "model"),
           _weights_of(tiny_model), "sft resumed")
    h1 = json.loads((tmp_path / "one" / "sft" / "metrics.json").read_text())["loss"]
    h2 = json.loads((tmp_path / "two" / "sft" / "metrics.json").read_text())["loss"]
    assert len(h1) == len(h2) == 36
    for (s1, l1), (s2, l2) in zip(h1, h2):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4)


def _weights_of(model_dir):
    from pathlib import Path

    return _weights(Path(model_dir))
