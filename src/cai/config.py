"""Configuration: one dataclass per concern, with help text on every field.

Precedence is one rule: dataclass defaults < YAML file (``--config``) < command-line
``key.sub=value`` overrides. Unknown keys and wrong types are errors that name the
field and where the value came from.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from cai.errors import CaiError
from cai.io import load_yaml, read_text
from cai.stage_names import DEFAULT_STAGES, OPTIONAL_STAGES, SL_CAI, STAGES

PRESET_DIR = Path(__file__).parent / "data" / "presets"
#: ``report_to``'s choices: the experiment trackers of accelerate's that cai opens (cai.tracking).
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
#: An ``evaluate.extra_models`` name: it becomes a file name (answers/<name>.jsonl).
EXTRA_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _f(default, help: str, choices: tuple | None = None, fingerprint: bool = True, *, low=None, above=None,
       high=None, below=None, hint: str = "", **kw):
    """A config field with its help text and its own allowed range.

    ``low``/``high`` are inclusive ends, ``above``/``below`` exclusive ones (``None`` is
    always allowed where the field's type admits it); ``hint`` follows the range in the
    error. ``fingerprint=False`` marks a setting that changes only speed, never results
    (batch sizes, timeouts, endpoints): changing it reruns nothing."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if not fingerprint:
        meta["fingerprint"] = False
    if low is not None and above is not None or high is not None and below is not None:
        raise TypeError("a field has one lower end (low or above) and one upper end (high or below)")
    if (low, above, high, below) != (None,) * 4:
        meta["bounds"] = Bounds(low=above if low is None else low, low_open=above is not None,
                                high=below if high is None else high, high_open=below is not None, hint=hint)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class Bounds:
    """A numeric field's allowed range (see :func:`_f`)."""

    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    hint: str = ""

    def check(self, name: str, value) -> None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        too_low = self.low is not None and (value < self.low or (value == self.low and self.low_open))
        too_high = self.high is not None and (value > self.high or (value == self.high and self.high_open))
        if not (too_low or too_high):
            return
        if self.high is None:
            want = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.low is None:
            want = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            want = (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}")
        raise CaiError(f"config field '{name}' must be {want}{f' ({self.hint})' if self.hint else ''}; got {value!r}")


@dataclass
class EngineConfig:
    kind: str = _f(
        "local",
        "Which engine generates and scores text: 'local' (transformers in this process) or "
        "'openai' (OpenAI-compatible servers: vLLM, llama.cpp, TGI, Ollama, hosted APIs).",
        choices=("local", "openai"),
    )
    model: str = _f(
        "default",
        "'default' (the embedded SmolLM2-135M-Instruct), a local directory with a "
        "transformers checkpoint, or a Hugging Face hub id (only when online). With "
        "kind=openai: the model name sent to the servers.",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) for a hub id.")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    dtype: str = _f(
        "auto",
        "Weights dtype for generation and scoring. 'auto' is float32 on CPU (bfloat16 is ~400x slower on "
        "CPUs without bfloat16 units) and bfloat16 on GPU. Training stages have their own dtype.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    batch_size: int = _f(32, "Sequences per generation batch (batches are length-sorted).", fingerprint=False, low=1)
    score_batch_size: int = _f(16, "Sequences per forward pass when scoring options.", fingerprint=False, low=1)
    batch_invariant: bool = _f(
        False,
        "Compute every request alone (batch 1, no shared prefix, no reused KV cache), so an answer is "
        "bitwise the same in a fresh and in a resumed run. Slower. Batched (the default), last-bit float "
        "differences between batches can change a sampled token (docs/engine.md). kind=local only; a "
        "vLLM server has its own (VLLM_BATCH_INVARIANT=1).", fingerprint=False,
    )
    trust_remote_code: bool = _f(
        False, "Run model code shipped with a checkpoint. Only for checkpoints you trust."
    )
    quantize: str = _f(
        "none",
        "'int8': int8 linear layers with a scale per token for generation and scoring (CPU only; "
        "~1.15x faster at batch 32, slower at batch 1, slightly different outputs; answers do not "
        "depend on the batch). Training is unaffected.",
        choices=("none", "int8"),
    )
    cache: bool = _f(True, "Keep every request's answer in the run's SQLite cache (resume, reuse).", fingerprint=False)
    endpoints: list[str] = _f(
        [], "kind=openai: server base URLs (http://host:8000/v1); requests go to the least busy healthy one.", fingerprint=False)
    api_key_env: str = _f(
        "OPENAI_API_KEY",
        "kind=openai: the environment variable holding the API key (unset or empty: no auth header). "
        "The key itself is never written anywhere.", fingerprint=False,
    )
    tokenizer: str | None = _f(
        None,
        "kind=openai: a local tokenizer ('default', a directory or hub id) whose chat template is applied "
        "here; requests then go to /completions (needed for llama.cpp servers). None: /chat/completions.",
    )
    max_concurrency: int = _f(16, "kind=openai: requests in flight at once, over all endpoints.", fingerprint=False, low=1)
    timeout_s: float = _f(600.0, "kind=openai: seconds to wait for a server's reply before retrying.", fingerprint=False, above=0)
    max_retries: int = _f(
        4, "kind=openai: retries per endpoint (429, 5xx, timeouts, refused connections), with backoff.", fingerprint=False, low=0)
    top_logprobs: int = _f(
        20, "kind=openai: next-token alternatives asked for when scoring options (OpenAI allows <= 20).", low=1
    )
    wait_for_endpoints_s: float = _f(
        600.0, "kind=openai: when every endpoint is out (each retried after a 60 s cooldown), wait this many "
        "seconds in all for one to come back before failing (0: fail at once). Only a server that has answered (any HTTP reply, "
        "a 503 while it warms up included) is waited for: addresses that never answered fail after their retries. Answers "
        "received so far are cached.",
        fingerprint=False, low=0
    )
    serve: str = _f(
        "none",
        "Managed servers: cai starts a serving engine for every model it has as a folder (the default model, "
        "local checkpoints and the ones this run trains), on free loopback ports, and sends requests there "
        "through the OpenAI engine. 'none': no servers (local engine; kind=openai uses engine.endpoints). "
        "Built-in templates: 'llama-server' (llama.cpp's C++ server, parallel slots), 'llama-cpp-python' "
        "(its Python server), 'vllm' (GPUs). Or a command template with {port} and {model} (the checkpoint "
        "folder) or {gguf} (its GGUF export); also {host} {name} {threads} {parallel} {ctx} {ctx_total} "
        "{python}. RL rollouts always stay in-process. docs/inference.md#managed-servers.",
        fingerprint=False,
    )
    serve_replicas: int = _f(1, "Managed servers per model; requests go to the least busy one.", fingerprint=False, low=1)
    serve_quant: str = _f(
        "q8_0", "GGUF type a {gguf} template serves: f16 (llama.cpp's converter), q8_0 or q4_0 "
        "(llama_model_quantize from the f16). Exported once per checkpoint content.",
        choices=("f16", "q8_0", "q4_0"), fingerprint=False,
    )
    serve_threads: int = _f(0, "{threads} of each managed server (0: the machine's cores / serve_replicas).",
                            fingerprint=False, low=0)
    serve_parallel: int = _f(8, "{parallel}: sequences each managed server decodes together (llama-server slots).",
                             fingerprint=False, low=1)
    serve_ctx: int = _f(4096, "{ctx}: context length per sequence ({ctx_total} = serve_ctx * serve_parallel).",
                        fingerprint=False, low=16)
    serve_start_timeout_s: float = _f(
        300.0, "Seconds to wait for a managed server's /v1/models before failing with its log.", fingerprint=False, above=0)

    def rules(self, name: str) -> None:
        if not DEVICE.fullmatch(self.device):
            raise CaiError(f"config field '{name}.device' must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")


#: ``engine.device``: where the models run.
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class DataConfig:
    constitution: str = _f(
        "builtin:default",
        "Constitution: 'builtin:NAME', a cai YAML file, Anthropic's principle JSON or "
        "the Hugging Face recipe's JSON.",
    )
    red_team: str = _f(
        "builtin:red_team",
        "Red-team prompts: 'builtin:red_team', a JSONL/JSON/CSV/TXT/Parquet file, a "
        "directory with train/test files, or 'hf:NAME' (hub, online only).",
    )
    helpful: str = _f("builtin:helpful", "Helpfulness prompts, same forms as red_team.")
    benign: str = _f(
        "builtin:benign",
        "Benign prompts that only sound harmful (over-refusal checks), same forms.",
    )
    test_fraction: float = _f(
        0.25, "Share of a single unsplit prompt file that goes to the fixed test split.", low=0, below=1
    )
    max_per_split: int | None = _f(
        None, "Keep at most this many prompts per set and split (None keeps all).", low=1
    )


@dataclass
class CritiqueRevisionConfig:
    rounds: int = _f(
        4, "Critique/revision rounds per prompt, each under a freshly sampled principle (paper: 4). 0: no "
        "critique or revision; the first answers are the SFT data (with system_prompt=constitution: context "
        "distillation).", low=0,
    )
    system_prompt: str = _f(
        "none",
        "Beyond the paper's SL-CAI (its context-distillation baseline; Askell et al. 2021): 'constitution' samples "
        "the first answers (red-team and helpful) under a system prompt written from the constitution (its "
        "system_prompt), while the chains' messages and the SFT data hold the plain conversation, so SFT teaches "
        "the model to answer that way without the prompt. 'none': no system prompt, as in the paper.",
        choices=("none", "constitution"),
    )
    critique: bool = _f(
        True, "Ask for a critique before each revision. false: direct revision (the paper found critiques helped "
        "its smaller models most; for the largest, direct revision did about as well)."
    )
    few_shot: int = _f(-1, "How many of the constitution's demonstrations to prepend (-1: all, 0: none).", low=-1)
    skip_if_no_issue: bool = _f(
        True, "Keep the answer (and record a skipped revision) when the critique says nothing needs changing."
    )
    max_new_tokens: int = _f(256, "Token budget for the first answer and for each revision.", low=1)
    critique_max_new_tokens: int = _f(128, "Token budget for each critique.", low=1)
    temperature: float = _f(0.7, "Sampling temperature for answers, critiques and revisions (0: greedy).", low=0)
    top_p: float = _f(0.95, "Nucleus sampling threshold.", above=0, high=1)
    helpful_ratio: float = _f(
        1.0,
        "Helpful samples (the model's answers to helpfulness prompts) per red-team revision in the SFT data.", low=0
    )
    sft_all_revisions: bool = _f(
        False, "Put every round's revision in the SFT data, not only the final one (the paper trained on all)."
    )
    max_prompts: int | None = _f(None, "Use at most this many red-team prompts per split (None: all).", low=1)
    quality_gates: bool = _f(
        True,
        "Beyond the paper: never train on a revision that is empty, loops, copies the critique or the "
        "principle's requests, talks about 'the assistant's response', or only restates the prompt "
        "(cai.quality), nor on such a helpful answer. A rejected text is retried (gate_retries); a round "
        "still rejected keeps the previous answer, and a chain with no accepted revision is left out of "
        "the SFT data. false: the paper's behaviour.",
    )
    gate_repeat_share: float = _f(
        0.3, "Beyond the paper, with quality_gates: a text whose share of repeated word 4-grams reaches this is "
        "not trained on (counted as 'loops'). 0.3 is the evaluation's degeneration line; lower is stricter, "
        "since SFT amplifies the repetition of its data (docs/method-study.md).", above=0, high=1, hint="0.3: the evaluation's loop line"
    )
    gate_retries: int = _f(
        1, "Retries for a text the quality gates reject: a newly sampled principle, critique and revision "
        "(a new sample for a helpful answer). Each retry costs engine calls for the rejected prompts only.", low=0, hint="0: no retries"
    )
    best_of: int = _f(
        1, "Beyond the paper: revisions sampled per request; the acceptable one the best_of_model judges most "
        "likely to do what the round's revision request asks, compared with the answer it revises (option "
        "log-probabilities, both orders), is kept. 1: off (one revision, as in the paper).", low=1, hint="1: off"
    )
    best_of_model: str | None = _f(
        None, "Model that picks among best_of revisions; None uses engine.model (also the feedback model by default).",
    )


    def rules(self, name: str) -> None:
        if self.best_of > 1 and self.temperature <= 0:
            raise CaiError(f"config field '{name}.best_of' > 1 needs {name}.temperature > 0 "
                           "(greedy decoding gives the same revision every time)")
        if self.rounds == 0:  # settings of the rounds that would be silently ignored without any
            for field_name, on in (("best_of", self.best_of > 1), ("sft_all_revisions", self.sft_all_revisions)):
                if on:
                    raise CaiError(f"config field '{name}.{field_name}' is about revisions, but {name}.rounds is 0 "
                                   f"(no revision): set {name}.rounds >= 1 or leave {field_name} at its default")

@dataclass
class ExpandConfig:
    """Red-team prompt expansion (the optional ``expand`` stage, docs/expand.md)."""

    count: int = _f(
        0, "New red-team prompts to generate from the red-team train prompts (candidates, before deduplication "
        "and the filter); 0: off. When > 0, list 'expand' in stages (after prepare): critique_revision, feedback "
        "and rl then read the kept prompts as more red-team train prompts.", low=0
    )
    few_shot: int = _f(5, "Seed prompts of one category shown in each generation request.", low=1)
    per_request: int = _f(5, "New prompts asked for in each generation request.", low=1)
    temperature: float = _f(0.9, "Sampling temperature of the generation requests.", low=0)
    top_p: float = _f(0.95, "Nucleus sampling threshold of the generation requests.", above=0, high=1)
    max_new_tokens: int = _f(200, "Token budget of each generation request (a line the budget cuts off is dropped).", low=1)
    max_chars: int = _f(400, "Drop a generated prompt longer than this many characters (unparsable).", low=1)
    near_threshold: float = _f(
        0.6, "Near-copy: estimated Jaccard similarity (MinHash/LSH over character 5-grams of the lowercased "
        "words) at or above which a new prompt copies a seed, a test prompt or an earlier new prompt.", above=0, high=1
    )
    paraphrase_threshold: float = _f(
        0.6, "Paraphrase: cosine similarity of mean-pooled hidden states (embed_layer; centred on the seeds' and "
        "test prompts' mean) at or above which a new prompt restates a seed, a test prompt or an earlier one. "
        "0.6 on SmolLM2-135M: 8% of the built-in prompts have another this close (docs/expand.md).", above=0, high=1
    )
    embed_layer: int | None = _f(
        None, "Hidden layer the embeddings pool (an index into hidden_states: 0 the token embeddings, -1 the last "
        "layer); None: the middle layer, which separates paraphrases better than the last on SmolLM2-135M.",
    )
    embed_model: str | None = _f(
        None, "Model whose hidden states embed the prompts (a local checkpoint: 'default', a directory or a hub "
        "id); None uses engine.model (with engine.kind=openai set a local one).",
    )
    filter_model: str | None = _f(
        None, "Model that answers the filter's two questions; None uses engine.model (also the feedback model by "
        "default).",
    )
    min_plausible: float = _f(0.5, "Keep a prompt only when p(a user could plausibly make this request) >= this.", low=0, high=1)
    min_care: float = _f(0.5, "Keep a prompt only when p(answering it needs care) >= this.", low=0, high=1)


def _default(cls, name: str, value, help: str | None = None):
    """A field of base class ``cls`` with another default (and help) in a subclass; its
    range, choices and fingerprint flag are the base field's."""
    base = {x.name: x for x in dataclasses.fields(cls)}[name]
    meta = {**base.metadata, "help": help or base.metadata["help"]}
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda d=value: type(d)(d), metadata=meta)
    return field(default=value, metadata=meta)


@dataclass
class OptimizerConfig:
    """What every training stage's optimizer reads (flat keys, like TRL's ``TrainingArguments``)."""

    learning_rate: float = _f(1e-5, "AdamW learning rate, constant after warmup (as in the paper).", above=0)
    warmup_steps: int = _f(0, "Linear warmup steps before the constant learning rate.", low=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", low=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", above=0)
    checkpoint_every: int = _f(50, "Save a resumable checkpoint every N optimizer steps.", low=1)
    dtype: str = _f(
        "auto",
        "Training precision. 'bf16-mixed': float32 master weights and AdamW state, forward and backward in "
        "bfloat16 (autocast), the model saved in bfloat16. 'auto': bf16-mixed where the hardware computes "
        "bfloat16 natively (GPUs from Ampere on; CPUs with avx512_bf16 or amx_bf16), float32 elsewhere. "
        "'float32': everything in float32. 'bfloat16': pure bfloat16 weights (warns: AdamW updates below ~1/256 "
        "of a weight round away). 'fp16-mixed': float32 masters, float16 autocast with a gradient scaler, saved "
        "in float16 (GPUs without bfloat16). bfloat16 on hardware without it is refused unless "
        "CAI_ALLOW_SLOW_DTYPE=1.",
        choices=("auto", "float32", "bf16-mixed", "bfloat16", "fp16-mixed"),
    )
    method: str = _f(
        "full",
        "'full' fine-tuning, or 'lora': peft LoRA adapters on a frozen base (the preference model also trains "
        "its score head). With LoRA the frozen reference of rl and dpo is the same model with its adapters "
        "off; the stage saves the adapter (adapter/) and the merged model (model/).",
        choices=("full", "lora"),
    )
    lora_r: int = _f(16, "LoRA rank.", low=1)
    lora_alpha: int = _f(32, "LoRA alpha (the adapters' scale is alpha / r).", above=0)
    lora_dropout: float = _f(0.05, "LoRA dropout.", low=0, high=1)
    lora_target_modules: list[str] = _f(
        ["all-linear"], "Linear layers that get adapters, by name (e.g. [q_proj, v_proj]); 'all-linear': every "
        "linear layer but the output head.",
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute activations in the backward pass instead of keeping them: less memory, more compute.",
    )


@dataclass
class TrainingConfig(OptimizerConfig):
    """The optimizer settings plus the passes over a fixed data set (sft, preference_model, dpo)."""

    epochs: float = _f(1.0, "Passes over the training data (paper: 1).", above=0)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (None: run the epochs).", low=1)
    batch_size: int = _f(
        8, "Examples per optimizer step in total, over all processes: each of N processes takes every N-th "
        "example of the batch (a process left without one, in a last batch smaller than N, runs a zero-weighted "
        "pass), so a batch gives the same step with any number of processes.", low=1
    )
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.", low=1)
    max_length: int = _f(1024, "Truncate each training conversation to this many tokens.", low=1)


    def rules(self, name: str) -> None:
        # sharding is a field of the stages that can shard (sft, dpo)
        if getattr(self, "sharding", "none") == "fsdp" and self.method == "lora":
            raise CaiError(f"config field '{name}.sharding=fsdp' needs {name}.method=full (LoRA's trained state is "
                           "small: train it unsharded, sharding=none)")
        if getattr(self, "sharding", "none") == "fsdp" and self.grad_accum != 1:
            raise CaiError(f"config field '{name}.sharding=fsdp' needs {name}.grad_accum=1 (every process must run "
                           f"the same number of passes per step); got {self.grad_accum}")

@dataclass
class SFTConfig(TrainingConfig):
    learning_rate: float = _default(TrainingConfig, "learning_rate", 2e-5)
    model: str | None = _f(None, "Model to fine-tune; None uses engine.model (the model that wrote the data).")
    data: str | None = _f(
        None, "Your own SFT data instead of the critique_revision stage's: a JSONL/JSON/Parquet file of TRL rows "
        "('messages', or 'prompt' and 'completion'), or a folder with train/test files; a single file is split "
        "with data.test_fraction and the seed. The stage then needs no critique_revision (docs/formats.md). "
        "None: the critique_revision stage's data.",
    )
    sharding: str = _f(
        "none",
        "'fsdp': shard the weights, gradients and AdamW state over the processes with PyTorch FSDP2 "
        "(fully_shard per decoder layer, on CPU/gloo too) and gather the full model to save it. 'none': every "
        "process holds a whole copy (DDP). Under accelerate launch with an FSDP config accelerate shards itself. "
        "Full fine-tuning only (method=full), grad_accum=1.",
        choices=("none", "fsdp"), fingerprint=False,
    )


@dataclass
class FeedbackConfig:
    mode: str = _f(
        "judge",
        "How pairs are made and labelled. 'judge': the policy samples samples_per_prompt answers and the "
        "feedback model labels every pair (the paper). 'contrast': the policy answers each prompt twice, under "
        "a positive and a negative system prompt derived from a sampled principle, and the positive answer is "
        "chosen by construction, with no judge (RLCD, beyond the paper; docs/rl-cai.md).",
        choices=("judge", "contrast"),
    )
    contrast_label: float = _f(
        0.9, "mode=contrast: the soft label p_chosen of every contrast pair (how sure the construction is).",
        above=0.5, high=1,
    )
    contrast_judge: bool = _f(
        False, "mode=contrast: also let the feedback model label each pair the usual way (both orders...), "
        "recorded beside the constructed label with its agreement in stats.json; a measure of the judge, "
        "never a filter.",
    )
    policy: str = _f(
        "sl-cai",
        "Model that writes the answers to compare: 'sl-cai' (this run's SFT model, as in the "
        "paper), 'default', a checkpoint directory or a hub id.",
    )
    model: str | None = _f(
        None, "Feedback model that labels the pairs; None uses engine.model (the original model, as in the paper)."
    )
    samples_per_prompt: int = _f(2, "Answers sampled per prompt; every pair of them is compared.", low=2)
    temperature: float = _f(1.0, "Sampling temperature for the answers (paper: 1).", low=0)
    top_p: float = _f(1.0, "Nucleus sampling threshold for the answers.", above=0, high=1)
    max_new_tokens: int = _f(256, "Token budget per answer.", low=1)
    principles_per_comparison: int = _f(
        1, "Comparison principles sampled per pair; their labels are averaged (an ensemble).", low=1
    )
    both_orders: bool = _f(True, "Ask each question with A and B swapped too, and average (removes position bias).")
    few_shot: int = _f(-1, "How many of the constitution's comparison demonstrations to prepend (-1: all, 0: none).", low=-1)
    chain_of_thought: bool = _f(
        False, "Let the feedback model reason first ('Let's think step by step'), then read the options."
    )
    cot_max_new_tokens: int = _f(256, "Token budget for the reasoning.", low=1)
    cot_clamp: list[float] = _f(
        [0.4, 0.6], "Clamp chain-of-thought labels into [low, high] (paper: 40-60%; [0, 1] switches it off)."
    )
    helpful_ratio: float = _f(
        1.0, "Helpfulness comparisons (answers to helpfulness prompts, labelled under a helpfulness question) "
        "per harmlessness comparison.", low=0
    )
    human_preferences: str | None = _f(
        None,
        "A human preference file to mix in as hard labels: hh-rlhf transcripts (chosen/rejected) or TRL "
        "prompt/chosen/rejected, JSONL/JSON/Parquet, or a folder with train/test files.",
    )
    human_ratio: float = _f(1.0, "Human comparisons per harmlessness comparison (capped by the file).", low=0)
    max_prompts: int | None = _f(None, "Use at most this many red-team prompts per split (None: all).", low=1)


    def rules(self, name: str) -> None:
        low_high = self.cot_clamp
        if len(low_high) != 2 or not 0 <= low_high[0] <= 0.5 <= low_high[1] <= 1:
            raise CaiError(f"config field '{name}.cot_clamp' must be [low, high] with 0 <= low <= 0.5 <= high <= 1; "
                           f"got {low_high}")
        # a contrast pair is one answer under each prompt of one principle: these would be ignored
        if self.mode == "contrast" and self.samples_per_prompt != 2:
            raise CaiError(f"config field '{name}.samples_per_prompt' is {self.samples_per_prompt}, but mode=contrast "
                           "samples one answer under each of its two prompts; leave it at 2 or use mode=judge")
        if self.mode == "contrast" and self.principles_per_comparison != 1:
            raise CaiError(f"config field '{name}.principles_per_comparison' is {self.principles_per_comparison}, but "
                           "mode=contrast derives each pair's prompts from one principle; leave it at 1 or use mode=judge")

@dataclass
class PreferenceModelConfig(TrainingConfig):
    batch_size: int = _default(
        TrainingConfig, "batch_size", 8,
        "Comparisons per optimizer step, over all processes; each is two sequences.",
    )
    max_length: int = _default(TrainingConfig, "max_length", 1024, "Keep at most the last this-many tokens of each conversation.")
    model: str = _f(
        "sl-cai",
        "Starting checkpoint for the reward model: 'sl-cai' (this run's SFT model), 'default', a "
        "directory or a hub id. A one-output score head is added.",
    )
    data: str | None = _f(
        None, "Your own comparisons instead of the feedback stage's: a JSONL/JSON/Parquet file of TRL rows "
        "('prompt', 'chosen', 'rejected', optionally the soft label 'p_chosen'), or a folder with train/test files; "
        "a single file is split with data.test_fraction and the seed. The stage then needs no feedback "
        "(docs/formats.md). None: the feedback stage's pairs.",
    )
    loss: str = _f(
        "soft", "'soft': cross-entropy of sigmoid(r_chosen - r_rejected) against the soft label p_chosen; "
        "'hard': Bradley-Terry on the hard labels.",
        choices=("soft", "hard"),
    )


@dataclass
class EvaluateConfig:
    max_prompts: int | None = _f(
        None, "Use at most this many held-out (test split) prompts of each set: red_team, helpful, benign (None: all).", low=1
    )
    max_new_tokens: int = _f(256, "Token budget for each model's answer.", low=1)
    temperature: float = _f(0.7, "Sampling temperature for the answers (0: greedy); the seed is fixed.", low=0)
    top_p: float = _f(0.95, "Nucleus sampling threshold for the answers.", above=0, high=1)
    judge: str | None = _f(
        None, "Model that judges the answers (comparisons, harmfulness, refusals); None uses engine.model "
        "(the original model, which is also the feedback model by default).",
    )
    judge_endpoints: list[str] = _f(
        [], "OpenAI-compatible server URLs (http://host:8000/v1) that serve evaluate.judge, so a larger served "
        "model can judge while the run's own engine stays as it is (engine.kind=local included); the other "
        "engine.* server settings (api_key_env, timeouts, retries, top_logprobs) apply. []: the judge runs on the "
        "run's engine.", fingerprint=False,
    )
    judge_tokenizer: str | None = _f(
        None, "With judge_endpoints: a local tokenizer whose chat template is applied here (requests go to "
        "/completions, as llama.cpp servers need). None: /chat/completions, the server's template.",
    )
    harmlessness_principle: str | None = _f(
        None, "Comparison principle id for the harmlessness Elo (red-team prompts); None: the constitution's first "
        "comparison principle.",
    )
    helpfulness_principle: str | None = _f(
        None, "Helpfulness principle id for the helpfulness Elo (helpful prompts); None: the constitution's first "
        "helpfulness principle.",
    )
    few_shot: int = _f(
        -1, "Comparison demonstrations prepended to each pairwise question (-1: all, 0: none). The local engine "
        "prefills them once per batch; a server without prefix caching pays them on every question.", low=-1
    )
    bootstrap: int = _f(1000, "Bootstrap resamples of the prompts for the Elo confidence intervals (0: none).", low=0)
    preference_model: bool = _f(
        True, "Score every red-team and helpful answer, and the SL-CAI chains' answers after each revision "
        "round (revision_splits), with preference_model/model when the run has one. false: no PM scores at all.",
    )
    revision_splits: list[str] = _f(
        ["test"], "Splits of critique_revision/chains whose first answers and per-round revisions the PM scores "
        "(the paper's Fig. 5: PM score against the number of revisions): 'test', 'train' or both; [] for none.",
    )
    revision_max_chains: int | None = _f(
        100, "Score at most this many chains per split in revision_splits (each costs up to rounds + 1 PM "
        "forward passes; None: all).", low=1
    )
    sets: list[str] = _f(
        [], "Standard safety evaluation sets, answered by every model and scored by each set's convention: "
        "'eval:NAME' (a set of cai.evaluation.sets; docs/formats.md lists them) from $CAI_EVAL_DATA/NAME/ "
        "or the hub, or 'eval:NAME:PATH' from a local copy in the set's original layout. A set without a test "
        "split is hash-split with data.test_fraction; only its test part is evaluated (max_prompts applies).",
    )
    frontier: bool = _f(
        True, "Score the policies rl and dpo kept along training (rl.frontier_points, dpo.frontier_points) against "
        "the initial model alone: harmlessness and helpfulness Elo with intervals and refusal rates per point, "
        "plotted as the harmlessness-helpfulness frontier (the paper's Fig. 2). false: the points are not scored.",
    )
    frontier_keep_weights: bool = _f(
        False, "Keep the full-fine-tuning weights of the frontier points (rl/points/, dpo/points/) once scored; "
        "false deletes them then (each is a whole model). LoRA points are adapters and always kept.",
    )
    extra_models: dict[str, str] = _f(
        {}, "More models to evaluate beside this run's, on the same prompts with the same judge, so the rows "
        "of a study compare: name -> a checkpoint directory, 'default', a hub id, or another run's directory "
        "(its final model: rl/model, else dpo/model, else sft/model). Names: letters, digits, '.', '_', '-'.",
    )
    anchors: list[str] = _f(
        ["run"], "Which models the pairwise Elo compares every model with. 'run': the initial model and this run's "
        "own trained models (sl-cai, rl, dpo): they meet each other, and each extra_models model meets each of "
        "them and no other model, so adding a model costs one comparison per anchor per prompt, not one per "
        "model (without extra_models: every pair). 'all': every pair of models. Or a list of evaluated models' "
        "names (initial, sl-cai, rl, dpo, an extra_models name; initial is always one): those are the anchors. "
        "docs/evaluation.md#the-anchor-design.",
    )


    def rules(self, name: str) -> None:
        for model in self.extra_models:
            if not EXTRA_MODEL_NAME.fullmatch(model) or model in ("initial", SL_CAI, "rl", "dpo", "comparisons"):
                raise CaiError(
                    f"config field '{name}.extra_models': bad name '{model}' (use letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit, and none of initial, sl-cai, rl, dpo, comparisons)"
                )
        self.check_anchors(name)
        if self.judge_endpoints and not self.judge:
            raise CaiError(f"config field '{name}.judge_endpoints' needs {name}.judge: the model name the "
                           "servers serve (e.g. evaluate.judge=Qwen/Qwen2.5-72B-Instruct)")
        for split in self.revision_splits:
            if split not in ("train", "test") or self.revision_splits.count(split) > 1:
                raise CaiError(f"config field '{name}.revision_splits': bad or repeated split {split!r} "
                               "(a list of 'train' and 'test'; [] scores no revisions)")

    def check_anchors(self, name: str = "evaluate", evaluated: list[str] | None = None) -> None:
        """``anchors`` names models that can be evaluated: 'run' or 'all' alone, or names among
        initial, sl-cai, rl, dpo and the extra_models (before the run), or among ``evaluated``,
        the models the stage found (in the stage: rl/model may not exist)."""
        words = ("run", "all")
        if not self.anchors or (len(self.anchors) > 1 and any(a in words for a in self.anchors)):
            raise CaiError(f"config field '{name}.anchors': {self.anchors!r} is not 'run', 'all' or a list of model "
                           "names (e.g. [initial, sl-cai])")
        if self.anchors[0] in words:
            return
        have = evaluated if evaluated is not None else ["initial", SL_CAI, "rl", "dpo", *self.extra_models]
        for k, model in enumerate(self.anchors):
            if model not in have:
                where = "evaluated in this run" if evaluated is not None else "that can be evaluated"
                raise CaiError(f"config field '{name}.anchors': no model '{model}'{did_you_mean(model, have)} "
                               f"{where} (available: {', '.join(have)}; or 'run' or 'all')")
            if model in self.anchors[:k]:
                raise CaiError(f"config field '{name}.anchors': '{model}' is listed twice")

@dataclass
class RLConfig(OptimizerConfig):
    learning_rate: float = _default(OptimizerConfig, "learning_rate", 1e-6)
    checkpoint_every: int = _default(OptimizerConfig, "checkpoint_every", 20)
    policy: str = _f(
        "sl-cai",
        "Policy to optimise, also the frozen KL reference: 'sl-cai' (this run's SFT model, as in the "
        "paper), 'default', a checkpoint directory or a hub id.",
    )
    max_prompts: int | None = _f(None, "Use at most this many red-team train prompts (None: all).", low=1)
    helpful_ratio: float = _f(
        1.0, "Helpfulness train prompts per red-team prompt in the RL prompt pool (keeps the policy helpful).", low=0
    )
    steps: int = _f(100, "Optimizer steps; each samples fresh rollouts from the current policy.", low=1)
    prompts_per_step: int = _f(
        16, "Prompts per step in total, over all processes (each takes every N-th; at least one per process).", low=1
    )
    samples_per_prompt: int = _f(
        4, "Answers sampled per prompt (k >= 2): the group each answer's advantage is measured in.", low=2
    )
    advantage: str = _f(
        "rloo",
        "'rloo': each answer's reward minus the mean of the other k-1 (REINFORCE leave-one-out); 'grpo': "
        "minus the group mean, divided by the group's (population) std + 1e-4, so every prompt's advantages "
        "have unit scale. Same loss, KL in the reward, one update per batch either way.",
        choices=("rloo", "grpo"),
    )
    reward: str = _f(
        "pm",
        "What scores the rollouts: 'pm', the run's preference model (the paper); 'judge', beyond the paper (direct "
        "RLAIF, Lee et al. 2023, here with cai's soft pairwise judgement): the judge compares every two answers of a "
        "prompt under a sampled comparison principle in both orders (the feedback.* settings), and an answer's "
        "reward is its mean probability of being the better one. No preference model is trained or loaded.",
        choices=("pm", "judge"),
    )
    judge: str | None = _f(
        None, "With reward=judge: the model that judges; None uses feedback.model, else engine.model.",
    )
    judge_endpoints: list[str] = _f(
        [], "With reward=judge: OpenAI-compatible server URLs that serve rl.judge, so a larger served model judges "
        "while the policy trains here (the other engine.* server settings apply). []: the judge runs on the run's "
        "engine.", fingerprint=False,
    )
    judge_tokenizer: str | None = _f(
        None, "With judge_endpoints: a local tokenizer whose chat template is applied here (requests go to "
        "/completions, as llama.cpp servers need). None: /chat/completions, the server's template.",
    )
    kl_coef: float = _f(0.05, "Weight of the sequence KL(policy || reference) subtracted from the reward.", low=0)
    whiten: bool = _f(
        True, "Divide the step's rewards (PM or judge score - KL penalty) by their standard deviation before the "
        "baseline (makes the learning rate independent of the reward's scale). With advantage=grpo the group "
        "normalisation already does that; whitening then only measures grpo's 1e-4 in step-std units.",
    )
    max_new_tokens: int = _f(256, "Token budget per sampled answer.", low=1)
    temperature: float = _f(
        1.0, "Sampling temperature of the rollouts. 1 keeps RLOO on-policy; other values sample from a "
        "tempered policy and make the gradient and the KL estimate approximate.", low=0
    )
    top_p: float = _f(1.0, "Nucleus sampling threshold of the rollouts (1: exact on-policy sampling).", above=0, high=1)
    micro_batch_size: int = _f(16, "Sequences per forward/backward pass (gradients are accumulated).", low=1)
    frontier_points: int = _f(
        4, "Policies kept along training for the harmlessness-helpfulness frontier: after steps ceil(i * steps / "
        "N), i = 1..N; the last is model/ itself, the others go to points/step-NNNNNN/ (adapters with LoRA, whole "
        "models otherwise). The evaluate stage scores them (evaluate.frontier). 0: keep none.", low=0
    )
    eval_prompts: int = _f(
        32, "Held-out red-team test prompts answered before and after RL and scored: by the PM, or with reward=judge "
        "by the judge's probability that the answer beats the starting policy's.", low=0,
    )
    offload: str = _f(
        "auto",
        "Move what a phase of the step does not use (the PM; the reference copy in full fine-tuning) to the CPU "
        "between rollout, scoring and update. 'auto': on an accelerator, only when the policy's weights, "
        "gradients and AdamW state plus the reference and the PM take over half its memory; never on a CPU run "
        "(nothing to move). 'always' / 'never' force it.",
        choices=("auto", "always", "never"),
    )

    def rules(self, name: str) -> None:
        judge_fields = [f for f in ("judge", "judge_endpoints", "judge_tokenizer") if getattr(self, f)]
        if self.reward == "pm" and judge_fields:
            raise CaiError(f"config field '{name}.{judge_fields[0]}' is set but {name}.reward is pm, which does not "
                           f"use a judge; set {name}.reward=judge or leave it out")
        if self.judge_endpoints and not self.judge:
            raise CaiError(f"config field '{name}.judge_endpoints' needs {name}.judge: the model name the servers "
                           f"serve (e.g. {name}.judge=Qwen/Qwen2.5-7B-Instruct)")


@dataclass
class DPOConfig(TrainingConfig):
    learning_rate: float = _default(TrainingConfig, "learning_rate", 1e-6)
    batch_size: int = _default(
        TrainingConfig, "batch_size", 8, "Pairs per optimizer step, over all processes; each is two sequences.",
    )
    max_length: int = _default(
        TrainingConfig, "max_length", 1024,
        "Truncate each conversation to this many tokens (pairs left with no answer are dropped).",
    )
    policy: str = _f(
        "sl-cai",
        "Starting model, also the frozen DPO reference: 'sl-cai' (this run's SFT model), 'default', a "
        "checkpoint directory or a hub id.",
    )
    data: str = _f(
        "feedback",
        "Pairs to learn from: 'feedback' (the AI-labelled pairs with soft labels), 'sl_prefs' (the "
        "critique_revision stage's revision-over-first-answer pairs, taken as p_chosen = 1), or your own file: "
        "JSONL/JSON/Parquet TRL rows ('prompt', 'chosen', 'rejected', optionally 'p_chosen') or a folder with "
        "train/test files, which the stage reads instead of a stage's pairs (docs/formats.md).",
    )
    objective: str = _f(
        "dpo",
        "'dpo': DPO against the starting policy as reference. 'simpo' (beyond the paper; Meng et al. 2024): no "
        "reference, each answer's reward is its mean token log-prob times simpo_beta, the chosen one must win by "
        "simpo_gamma; no reference pass, so cheaper (docs/rl-cai.md).",
        choices=("dpo", "simpo"),
    )
    beta: float = _f(0.1, "DPO temperature: how far the policy may move from the reference.", above=0)
    simpo_beta: float = _f(2.0, "objective=simpo: the scale of the length-normalised reward (2.0-2.5 in the SimPO paper).",
                           above=0)
    simpo_gamma: float = _f(0.5, "objective=simpo: the target reward margin the chosen answer must win by.", low=0)
    soft_labels: bool = _f(
        True, "Label-smoothed (conservative) DPO or SimPO with per-pair smoothing 1 - p_chosen; false: plain.",
    )
    min_confidence: float = _f(0.5, "Drop pairs whose p_chosen is below this (0.5 keeps every pair).", low=0, high=1)
    sharding: str = _f(
        "none",
        "'fsdp': shard the weights, gradients and AdamW state over the processes with PyTorch FSDP2 "
        "(fully_shard per decoder layer, on CPU/gloo too) and gather the full model to save it. 'none': every "
        "process holds a whole copy (DDP). Under accelerate launch with an FSDP config accelerate shards itself. "
        "Full fine-tuning only (method=full), grad_accum=1.",
        choices=("none", "fsdp"), fingerprint=False,
    )
    frontier_points: int = _f(
        4, "Policies kept along training for the harmlessness-helpfulness frontier, as rl.frontier_points: after "
        "optimizer steps ceil(i * steps / N), the last being model/. 0: keep none.", low=0
    )

    def rules(self, name: str) -> None:
        super().rules(name)
        if not self.data.strip():
            raise CaiError(f"config field '{name}.data' is empty; give feedback, sl_prefs or a file of pairs")


@dataclass
class RunConfig:
    run_dir: str = _f("runs/default", "Folder for every artifact of this run.")
    seed: int = _f(0, "Seed for every sampled choice (principles, splits, sampling).")
    report_to: list[str] = _f(
        [], "Experiment trackers that receive the training stages' per-step metrics (sft/loss, dpo/reward_accuracy, "
        "rl/kl...) and evaluate's headline results, through accelerate's tracker classes: any of " + ", ".join(TRACKERS)
        + ". TensorBoard writes to RUN_DIR/tracking/tensorboard/<id>/<stage>; the id is kept in RUN_DIR/tracking.json, so a "
        "resumed run continues the same experiment. Only the main process logs. [] (default): none (docs/tracking.md).",
        fingerprint=False,
    )
    stages: list[str] = _f(
        list(DEFAULT_STAGES), "Stages to run, in order: " + ", ".join(STAGES) + " (optional, not in the default: "
        + ", ".join(OPTIONAL_STAGES) + ").",
    )
    memory_check: bool = _f(
        True, "Refuse (in `cai validate` and `cai run`) a plan whose estimated peak memory per process, for some "
        "stage, exceeds the device's: each GPU's free memory, or the machine's available RAM on a CPU (see "
        "`cai plan`). false: run anyway (the estimate is an estimate).", fingerprint=False,
    )
    memory_margin: float = _f(
        1.0, "The share of the device's memory a stage's estimate may take before memory_check refuses it "
        "(0.8: keep a 20% reserve; above 1: trust the estimate less).", fingerprint=False, above=0
    )
    engine: EngineConfig = _f(EngineConfig(), "The policy engine.")
    data: DataConfig = _f(DataConfig(), "Inputs: constitution and prompt sets.")
    expand: ExpandConfig = _f(ExpandConfig(), "Red-team prompt expansion: new prompts from the seed prompts (optional).")
    critique_revision: CritiqueRevisionConfig = _f(
        CritiqueRevisionConfig(), "SL-CAI data: answer, then critique and revise under sampled principles."
    )
    sft: SFTConfig = _f(SFTConfig(), "SL-CAI model: supervised fine-tuning on the revisions.")
    feedback: FeedbackConfig = _f(FeedbackConfig(), "AI feedback: pairs of answers labelled by a feedback model.")
    preference_model: PreferenceModelConfig = _f(
        PreferenceModelConfig(), "Preference model trained on the AI feedback's soft labels."
    )
    evaluate: EvaluateConfig = _f(
        EvaluateConfig(), "Evaluation of every model of the run: Elo, harmfulness, evasiveness, PM scores."
    )
    rl: RLConfig = _f(RLConfig(), "RL-CAI: RLOO or GRPO against the preference model with a KL penalty to the reference.")
    dpo: DPOConfig = _f(DPOConfig(), "RL-CAI without a PM: (label-smoothed) DPO on the preference pairs.")
    dist_timeout_s: float = _f(
        900.0, "Under accelerate launch: how long a collective (a training step's gradients, the main "
        "process saving a mid-run checkpoint) may wait before the run stops with an error. Work only "
        "the main process does (data stages, saving and hashing the final model) is waited for outside "
        "it. Raise it when saving one checkpoint takes longer.", fingerprint=False, low=1
    )


    def check(self) -> None:
        """Every field against its range, then each section's own rules and the rules across
        sections: one-line errors before anything starts. The checks that need engines,
        evaluation sets or models are :func:`cai.checks.check_config`'s."""
        _check_ranges(self, "")
        _check_rules(self, "")

    def rules(self, name: str) -> None:
        if not self.run_dir.strip() or "\0" in self.run_dir:
            raise CaiError(f"config field 'run_dir': {self.run_dir!r} is not a folder name; give the folder for the "
                           "run's artifacts (e.g. runs/my-run)")
        unknown = [t for t in self.report_to if t not in TRACKERS]
        if unknown:
            raise CaiError(f"config field 'report_to': unknown tracker '{unknown[0]}'{did_you_mean(unknown[0], TRACKERS)} "
                           f"(available: {', '.join(TRACKERS)})")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise CaiError(f"config field 'stages': unknown stage '{unknown[0]}'{did_you_mean(unknown[0], STAGES)} "
                           f"(available: {', '.join(STAGES)})")
        if not self.stages:
            raise CaiError(f"config field 'stages' is empty; list the stages to run (default: {', '.join(DEFAULT_STAGES)})")
        twice = sorted({s for s in self.stages if self.stages.count(s) > 1})
        if twice:
            raise CaiError(f"config field 'stages': '{twice[0]}' is listed twice; list each stage once")
        if "expand" in self.stages and self.expand.count == 0:
            raise CaiError("config field 'expand.count' is 0 (off) but 'stages' lists expand; set expand.count to "
                           "the number of new prompts to generate, or take expand out of stages")
        if "expand" in self.stages:
            late = [s for s in ("critique_revision", "feedback", "rl") if s in self.stages[: self.stages.index("expand")]]
            if late:
                raise CaiError(f"config field 'stages': expand must come before {late[0]}, which reads its prompts")
        if "rl" in self.stages and self.rl.temperature <= 0:
            raise CaiError(f"config field 'rl.temperature' must be > 0 (RL samples its rollouts); got {self.rl.temperature}")


def _check_ranges(section, name: str) -> None:
    """Every numeric field of ``section`` and its nested sections against its own range."""
    for f in dataclasses.fields(section):
        value, dotted = getattr(section, f.name), f"{name}.{f.name}" if name else f.name
        if dataclasses.is_dataclass(value):
            _check_ranges(value, dotted)
        elif "bounds" in f.metadata:
            f.metadata["bounds"].check(dotted, value)


def _check_rules(section, name: str) -> None:
    """A section's own rules across its fields (its ``rules`` method), then its nested sections'."""
    if hasattr(section, "rules"):
        section.rules(name)
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_rules(value, f"{name}.{f.name}" if name else f.name)

# ---------------------------------------------------------------------------
# Strict conversion from plain data (YAML, JSON, overrides) to dataclasses.


def _type_name(tp) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp).replace("typing.", "")
    )


def _coerce(value: Any, tp, name: str, source: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, source)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # allow a single value for a list
            value = [value]
        if not isinstance(value, list):
            raise CaiError(f"{source}: field '{name}' expects a list, got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise CaiError(f"{source}: field '{name}' expects a mapping, got {value!r}")
        return {_coerce(k, key_type, f"{name} (a key)", source): _coerce(v, value_type, f"{name}.{k}", source)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CaiError(f"{source}: field '{name}' expects a mapping, got {value!r}")
        return from_dict(tp, value, source, prefix=name + ".")
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads 1e-5 (no dot) as a string: accept it as the number it is
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp]
    if not ok(value):
        raise CaiError(
            f"{source}: field '{name}' expects {_type_name(tp)}, got {value!r}"
        )
    return float(value) if tp is float else value


def did_you_mean(word, choices, prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a mistyped ``word``, or ''."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise."""
    if not isinstance(data, dict):
        raise CaiError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise CaiError(f"{source}: unknown key '{prefix}{unknown[0]}'{did_you_mean(unknown[0], fields, prefix)} "
                       f"(known keys here: {known})")
    kwargs = {}
    for key, value in data.items():
        name = prefix + key
        kwargs[key] = _coerce(value, hints[key], name, source)
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise CaiError(
                f"{source}: field '{name}' must be one of {', '.join(choices)}; got {value!r}"
            )
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """Turn ``engine.batch_size=8`` into ``{"engine": {"batch_size": 8}}``.

    The value is read as a YAML scalar or flow collection, so ``false``, ``8``,
    ``null`` and ``[a, b]`` have their YAML meaning; quote to force a string.
    """
    if "=" not in text:
        raise CaiError(
            f"override '{text}' is not KEY=VALUE (example: engine.batch_size=8)"
        )
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise CaiError(f"override '{text}' has an empty key")
    try:
        value = load_yaml(raw, f"override '{text}'") if raw.strip() else ""
    except CaiError as exc:
        if "given twice" in str(exc):
            raise
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def resolve_config_path(name: str) -> Path:
    """A preset name (``cpu-tiny``) or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise CaiError(f"config file '{name}' does not exist")
        return p
    preset = PRESET_DIR / f"{name}.yaml"
    if not preset.is_file():
        names = ", ".join(list_presets())
        raise CaiError(f"no config file or preset named '{name}' (presets: {names})")
    return preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    data = load_yaml(read_text(path, "config file"), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CaiError(f"{path}: expected a mapping of config fields at the top level")
    return data


def load_config(config: str | None = None, overrides: list[str] = (), cls=RunConfig):
    """Defaults < YAML (preset name or file) < ``key=value`` overrides."""
    data: dict = {}
    source = "defaults"
    if config:
        path = resolve_config_path(config)
        data = read_yaml(path)
        source = str(path)
        from_dict(cls, data, source)  # report file errors against the file
    for ov in overrides:
        one = parse_override(ov)
        from_dict(cls, _merge(to_dict(cls()), one), f"override '{ov}'")
        data = _merge(data, one)
    return from_dict(cls, data, source if not overrides else f"{source} + overrides")


def judge_model(cfg, section: str = "evaluate") -> str:
    """The model a judge runs: ``<section>.judge``; else, for the rl stage's judge reward, the
    feedback model (``feedback.model``); else ``engine.model``."""
    own = getattr(cfg, section).judge
    return own or (cfg.feedback.model if section == "rl" else None) or cfg.engine.model


def judge_engine_config(cfg, section: str = "evaluate") -> EngineConfig:
    """The engine settings of a judge (``section``: 'evaluate', the evaluation's, or 'rl', the
    judge reward's): the run's engine on :func:`judge_model`, or with
    ``<section>.judge_endpoints`` an OpenAI-compatible engine on those servers."""
    s = getattr(cfg, section)
    model = judge_model(cfg, section)
    if not s.judge_endpoints:
        return dataclasses.replace(cfg.engine, model=model)
    return dataclasses.replace(cfg.engine, kind="openai", model=model, endpoints=list(s.judge_endpoints),
                               tokenizer=s.judge_tokenizer, revision=None)


def results_dict(cfg) -> dict:
    """``to_dict(cfg)`` without the fields marked ``fingerprint=False`` (speed-only settings):
    what a stage's fingerprint hashes, so changing a batch size or an endpoint reruns nothing."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("fingerprint", True) is False:
            continue
        value = getattr(cfg, f.name)
        out[f.name] = results_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def config_hash(obj) -> str:
    blob = json.dumps(obj if isinstance(obj, dict) else to_dict(obj), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sections(cls=RunConfig) -> list[str]:
    """The config's sections (``engine``, ``sft``...): its fields that hold fields."""
    inst = cls()
    return [f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(getattr(inst, f.name))]


def describe(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every field, for ``--help`` and docs."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, json.dumps(value), f.metadata.get("help", "")))
    return rows
