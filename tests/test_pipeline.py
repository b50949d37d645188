"""The run directory: manifests, skipping finished stages, no half-written output."""

import json

import pytest

from cai.config import load_config
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.pipeline import run_pipeline


def _cfg(tmp_path, tiny_model, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "stages=[prepare]", *extra])


def test_prepare_writes_manifest_and_readable_artifacts(tmp_path, tiny_model):
    import datasets

    run = run_pipeline(_cfg(tmp_path, tiny_model), log=lambda m: None)
    manifest = json.loads((run / "prepare" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["red_team_train"] > 100
    assert manifest["versions"]["torch"] and manifest["inputs"]
    ds = datasets.load_dataset("json", data_dir=str(run / "prepare" / "prompts" / "red_team"))
    assert set(ds) == {"train", "test"} and "messages" in ds["test"].column_names
    assert load_constitution(run / "prepare" / "constitution.yaml").principles
    assert (run / "config.yaml").is_file() and not (run / "prepare.partial").exists()


def test_rerun_skips_finished_and_reruns_changed(tmp_path, tiny_model):
    logs = []
    run_pipeline(_cfg(tmp_path, tiny_model), log=logs.append)
    stamp = (tmp_path / "run" / "prepare" / "manifest.json").stat().st_mtime_ns
    logs.clear()
    run_pipeline(_cfg(tmp_path, tiny_model), log=logs.append)
    assert any("already finished" in m for m in logs)
    assert (tmp_path / "run" / "prepare" / "manifest.json").stat().st_mtime_ns == stamp
    logs.clear()
    run_pipeline(_cfg(tmp_path, tiny_model, "data.max_per_split=5"), log=logs.append)
    assert not any("already finished" in m for m in logs)
    counts = json.loads((tmp_path / "run" / "prepare" / "manifest.json").read_text())["counts"]
    assert counts["red_team_train"] == 5


def test_failed_stage_keeps_the_finished_artifact(tmp_path, tiny_model):
    run_pipeline(_cfg(tmp_path, tiny_model), log=lambda m: None)
    before = (tmp_path / "run" / "prepare" / "manifest.json").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(CaiError, match="bad.jsonl:2"):
        run_pipeline(_cfg(tmp_path, tiny_model, f"data.red_team={bad}"), log=lambda m: None)
    assert (tmp_path / "run" / "prepare" / "manifest.json").read_text() == before


def test_unknown_stage_is_an_error_before_anything_runs(tmp_path, tiny_model):
    with pytest.raises(CaiError, match="unknown stage 'sft2'"):
        run_pipeline(_cfg(tmp_path, tiny_model, "stages=[prepare, sft2]"), log=lambda m: None)
    assert not (tmp_path / "run" / "prepare").exists()


def test_an_interrupted_stage_resumes_only_under_the_same_configuration(tmp_path, tiny_model):
    """A stage's .partial folder (training checkpoints) is kept for a rerun with the same
    configuration and cleared when the configuration changed."""
    from cai.config import load_config as load
    from cai.pipeline import PARTIAL_STAMP, fingerprints

    run_pipeline(_cfg(tmp_path, tiny_model), log=lambda m: None)
    run = tmp_path / "run"
    assert not (run / "prepare" / PARTIAL_STAMP).exists()  # the stamp never reaches the artifact

    def interrupted(cfg):  # what a SIGKILL in the middle of the sft stage leaves behind
        partial = run / "sft.partial"
        partial.mkdir(exist_ok=True)
        (partial / PARTIAL_STAMP).write_text(fingerprints(cfg)["sft"] + "\n")
        (partial / "checkpoint").mkdir(exist_ok=True)
        (partial / "checkpoint" / "state.json").write_text("{}")

    from cai.pipeline import _fresh_partial

    old = load(None, [f"run_dir={run}", f"engine.model={tiny_model}", "stages=[prepare, sft]"])
    interrupted(old)
    logs = []
    _fresh_partial(run / "sft.partial", fingerprints(old)["sft"], logs.append)
    assert (run / "sft.partial" / "checkpoint" / "state.json").exists() and not logs
    new = load(None, [f"run_dir={run}", f"engine.model={tiny_model}", "stages=[prepare, sft]", "sft.learning_rate=0.5"])
    assert fingerprints(new)["sft"] != fingerprints(old)["sft"]
    _fresh_partial(run / "sft.partial", fingerprints(new)["sft"], logs.append)
    assert not (run / "sft.partial" / "checkpoint").exists()
    assert (run / "sft.partial" / PARTIAL_STAMP).read_text().strip() == fingerprints(new)["sft"]
    assert any("another configuration" in m for m in logs)


def test_a_checkpoint_stays_until_the_finished_stage_is_in_place(tmp_path):
    """A training stage leaves its checkpoint in ``<stage>.partial/`` when it returns, so a run
    killed while the pipeline hashes the outputs resumes from it; the checkpoint is not an
    artifact (no hash in the manifest) and is gone once the folder is promoted."""
    from cai.artifacts import hash_outputs
    from cai.pipeline import PARTIAL_STAMP, _promote

    partial, final = tmp_path / "sft.partial", tmp_path / "sft"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "weights.bin").write_bytes(b"w")
    (partial / "checkpoint").mkdir()
    (partial / "checkpoint" / "trainer_state.json").write_text("{}")
    (partial / PARTIAL_STAMP).write_text("f\n")
    assert list(hash_outputs(partial)) == ["model/weights.bin"]
    _promote(partial, final)
    assert (final / "model" / "weights.bin").is_file()
    assert not (final / "checkpoint").exists() and not (final / PARTIAL_STAMP).exists() and not partial.exists()


def test_speed_only_settings_change_no_fingerprint():
    """Changing a batch size, a timeout or the endpoint list (after an out-of-memory error,
    or to replace a dead server) must not rerun anything; a result-changing field must."""
    from cai.config import load_config
    from cai.pipeline import fingerprints

    base = fingerprints(load_config("cpu-tiny"))
    for override in ("engine.batch_size=4", "engine.score_batch_size=3", "engine.max_concurrency=2",
                     "engine.timeout_s=5", "engine.max_retries=1", "engine.cache=false",
                     "engine.wait_for_endpoints_s=0", "engine.api_key_env=OTHER",
                     "engine.endpoints=[http://127.0.0.1:9/v1]", "engine.batch_invariant=true",
                     "report_to=[tensorboard, wandb]"):
        assert fingerprints(load_config("cpu-tiny", [override])) == base, override
    changed = fingerprints(load_config("cpu-tiny", ["engine.quantize=none"]))
    assert changed["prepare"] != base["prepare"] and changed["report"] != base["report"]
