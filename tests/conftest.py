"""Shared fixtures: a tiny chat model built in-process (no hub, no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not (loop.last and m['role'] == 'assistant' and continue_final_message is defined "
    "and continue_final_message) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The answer is: (A) red (B) blue. Which response is less harmful?",
    "How do I kill a Python process? Use kill -9 with the process id.",
    "Critique: the response is harmful. Revision: here is a safer answer.",
    "Human: hello there\n\nAssistant: hi! How can I help you today?",
] * 20


def build_tiny_model(path, seed: int = 0, split_parens: bool = False, merge_answer: bool = False,
                     arch: str = "llama"):
    """Save a 2-layer Llama with a byte-level BPE tokenizer and a chat template.

    ``merge_answer`` trains the tokenizer without the pre-tokenizer's word split, so that
    "The answer is: (A" becomes one token: an odd tokenizer for option scoring.
    ``arch="qwen2"`` saves a Qwen2 (biased projections) instead, and
    ``"qwen2-sliding"`` one whose layers attend through a 4-token sliding window.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_answer)
    tk.decoder = decoders.ByteLevel()
    corpus = CORPUS if not split_parens else [c.replace("(", "( ") for c in CORPUS]
    if merge_answer:
        corpus = corpus + ["The answer is: (A", "The answer is: (B"] * 30
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        sliding = arch == "qwen2-sliding"
        model = Qwen2ForCausalLM(Qwen2Config(
            **common, use_sliding_window=sliding, sliding_window=4 if sliding else None, max_window_layers=0,
            layer_types=["sliding_attention" if sliding else "full_attention"] * 2,
        ))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    from cai.engines.local import LocalEngine

    return LocalEngine(tiny_model, device="cpu", batch_size=4, score_batch_size=4)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never write into the user's cache from a unit test."""
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cai-cache"))


def cached_rows(path) -> int:
    """Rows in a run's request cache (``cache.sqlite``): 0 when it does not exist yet or is
    being written by a process that was just killed."""
    import sqlite3

    if not os.path.exists(path):
        return 0
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    except sqlite3.Error:
        return 0


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow end-to-end tests on the embedded model")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    slow = [i for i in items if i.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if not i.get_closest_marker("slow")]
