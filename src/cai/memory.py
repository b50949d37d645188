"""Peak memory per stage and per process, before anything loads.

Everything here works from a model's ``config.json`` alone: the model is built on the
``meta`` device (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``),
which gives the exact parameter count and every linear layer's shape without a byte of
weights. The embedded default (a GGUF) uses the config of its converted checkpoint when
that is cached, else the config transformers reads from the GGUF's metadata (once, then
cached under the cai cache).

A stage's estimate (``estimate(inputs)`` in its module) adds up parts with the functions
below; ``cai plan`` prints the sum per process next to the device's memory, and ``cai
validate`` / ``cai run`` refuse a plan that cannot fit (:func:`check_fit`).

**The parts** (bytes; N parameters, T trained ones, ``b`` bytes per element):

* weights: N x b(weights) in full fine-tuning (float32 masters: 4; pure bfloat16: 2);
  with LoRA the frozen base is N x b(compute dtype) and the adapters T x 4. Under
  bf16-mixed autocast also keeps a bfloat16 copy of every linear weight while the
  forward and backward run: 2 bytes per linear parameter, the output head's included
  (``autocast copies``);
* gradients: T x b(weights); AdamW's state: 2 x T x b(weights) (exp_avg, exp_avg_sq);
* reference: rl in full fine-tuning keeps a frozen copy of the policy (N x b(weights));
  with LoRA the reference is the policy with its adapters off, and dpo computes the
  reference log-probs once before training: both cost nothing;
* the PM in rl: its parameters x b(compute dtype, else float32);
* activations kept for the backward pass, per process, for ``B`` sequences of ``S``
  tokens (``B`` = the stage's micro-batch over the processes, ``S`` its longest sequence:
  a batch is padded to it). Counted on the embedded Llama with saved-tensor hooks
  (``benchmarks/bench_sft_memory.py``), per decoder layer and token, with h hidden, kv =
  kv heads x head dim, i the MLP width, c the compute dtype's bytes and w the trained
  weights' (4: float32 masters):

  - the two RMSNorms: each its input in float32 (4h) and, where its weight trains, its
    normalised input (w h);
  - the linear layers' inputs: under autocast each layer casts its input itself, so the
    five that read a norm (q, k, v, gate, up) keep 5h x c; without autocast each norm's
    output is kept once (2h x c). A frozen layer (LoRA's base) keeps none;
  - attention: q, k, v and its output, (2h + 2kv) x c, or 4h x c in a padded batch (with
    an attention mask the kernel is given k and v repeated to every query head); no S x S
    scores (a fused kernel); a padded batch's mask, B x S x S x c, once for all layers;
  - the MLP: the gate's and up's outputs, the activation's and their product, 4i x c
    (3i x c under LoRA, where the frozen down projection keeps no input);
  - each LoRA adapter on a layer of input width d: its dropout's mask (d x w, when
    lora_dropout > 0), its input in the compute dtype (d x c) and the rank-r middle (r x c).

  So bf16-mixed full fine-tuning keeps 16h + (9h + 4i) x 2 bytes a layer and token in a
  padded batch (31,872 for the 135M model: 0.91 MiB a token over its 30 layers). With
  gradient checkpointing only each layer's input (h x 4) plus one layer's full set. The
  output logits cost ``B x S x V x 12``: cross-entropy keeps their float32 log-softmax
  and the backward pass starts with its incoming gradient and its own, three float32
  copies (the forward's compute-dtype logits and their float32 copy, c + 8, are fewer);
  the PM's score head has no vocabulary-wide logits. Under autocast the output head's
  weight is cast too (V x h x c, among the autocast copies);
* the KV cache of generation: ``layers x 2 x kv x tokens x sequences x c``;
* sharded (FSDP, ``P`` processes): weights, gradients and AdamW state divided by P, plus
  two decoder layers gathered whole (the one running and the one prefetched).

The sum is the stage's peak *above* the runtime itself: the framework and its kernels
(``RUNTIME_BYTES``, added for the fit check) are left out of the stage's figure, which
is what ``benchmarks/bench_plan.py`` measures (peak resident memory minus the memory
after the imports).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import CaiError

GiB = 1 << 30
MiB = 1 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
#: What the runtime itself holds besides a stage's tensors: torch, transformers and their
#: kernels (~0.5 GiB resident on a CPU after the imports; a CUDA context is ~0.5 GiB).
RUNTIME_BYTES = GiB // 2


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a causal LM that memory depends on, counted on the meta device."""

    params: int  # every parameter, tied ones once
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head dim
    vocab: int
    tied: bool
    linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of each linear layer but the output head
    heads: int = 1  # attention (query) heads

    @property
    def linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linears)

    @property
    def pm_params(self) -> int:
        """A one-output sequence classifier on this body: no output head, a hidden x 1 score head."""
        return self.params - (0 if self.tied else self.vocab * self.hidden) + self.hidden

    @property
    def layer_params(self) -> int:
        """One decoder layer's parameters (all but the embeddings and the output head)."""
        heads = self.vocab * self.hidden * (1 if self.tied else 2)
        return (self.params - heads) // max(1, self.layers)

    def lora_params(self, r: int, targets: list[str]) -> int:
        """LoRA's trained parameters: ``r x (in + out)`` per targeted linear layer."""
        every = list(targets) == ["all-linear"]
        return sum(r * (i + o) for name, i, o in self.linears if every or name in targets)

    def kv_bytes(self, tokens: int, dtype_bytes: int) -> int:
        """The KV cache of ``tokens`` tokens (all sequences together)."""
        return self.layers * 2 * self.kv_dim * tokens * dtype_bytes


def shape_of(config) -> ModelShape:
    """A :class:`ModelShape` from a transformers config, by building the model on ``meta``."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = tuple((name.rsplit(".", 1)[-1], m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    emb = model.get_input_embeddings().weight
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()), layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), kv_dim=kv * head_dim,
        vocab=emb.shape[0], tied=head is not None and head.weight is emb, linears=linears, heads=heads,
    )


def model_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of a model setting, reading no weights; None where it is not
    on this machine (a hub id outside the local cache while offline)."""
    from transformers import AutoConfig

    from cai.models import DEFAULT_MODEL, cache_root, embedded_gguf, embedded_target, offline

    if name == DEFAULT_MODEL:
        converted = embedded_target()
        if (converted / "cai_model.json").is_file():
            return AutoConfig.from_pretrained(converted)
        saved = cache_root() / "configs" / converted.name
        if not (saved / "config.json").is_file():
            gguf = embedded_gguf()  # its metadata only (no tensors): transformers reads the config from it
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(saved)
        return AutoConfig.from_pretrained(saved)
    path = Path(name).expanduser()
    try:
        if path.exists():
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                          local_files_only=offline())
    except (OSError, ValueError):
        return None


# -- the estimate ------------------------------------------------------------------------------


@dataclass
class Memory:
    """A stage's peak memory per process, by part (bytes), and what it assumed."""

    parts: dict[str, int] = field(default_factory=dict)
    basis: str = ""  # e.g. "4 sequences x 310 tokens per process"

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def __add__(self, other: "Memory") -> "Memory":
        parts = dict(self.parts)
        for k, v in other.parts.items():
            parts[k] = parts.get(k, 0) + v
        return Memory(parts, "; ".join(b for b in (self.basis, other.basis) if b))

    def to_dict(self) -> dict:
        return {"stage_bytes": self.total, "parts": dict(self.parts), "basis": self.basis}


def largest(*options: "Memory") -> "Memory":
    """The phase of a stage with the highest peak (phases that do not overlap)."""
    return max(options, key=lambda m: m.total)


def layer_activations(shape: ModelShape, compute_bytes: int, weight_bytes: int, casts: bool, padded: bool,
                      lora: tuple[int, list[str], bool] | None = None) -> int:
    """Bytes one decoder layer keeps for the backward pass per token (see the module docstring).
    ``casts``: autocast casts each linear layer's input (float32 masters, a lower compute
    dtype); ``padded``: a batch of several sequences (an attention mask); ``lora``: (rank,
    target modules, dropout on) of a frozen base with adapters."""
    h, kv, i, c = shape.hidden, shape.kv_dim, shape.intermediate, compute_bytes
    attention = (4 * h if padded else 2 * h + 2 * kv) * c
    if lora is None:
        norms = 2 * (4 * h + weight_bytes * h)
        inputs = (5 if casts else 2) * h * c
        return norms + inputs + attention + 4 * i * c
    r, targets, dropout = lora
    every = list(targets) == ["all-linear"]
    adapters = sum(d * ((weight_bytes if dropout else 0) + c) + r * c
                   for name, d, _ in shape.linears if every or name in targets) // max(1, shape.layers)
    return 2 * 4 * h + attention + 3 * i * c + adapters


def activations(shape: ModelShape, seqs: int, tokens: int, per_layer: int, checkpointing: bool,
                compute_bytes: int, lm_logits: bool = True) -> int:
    """Activations kept for the backward pass of ``seqs`` sequences of ``tokens`` tokens,
    ``per_layer`` bytes a decoder layer and token (:func:`layer_activations`)."""
    n = seqs * tokens
    if checkpointing:
        body = n * (shape.layers * shape.hidden * 4 + per_layer)
    else:
        body = n * shape.layers * per_layer
    mask = seqs * tokens * tokens * compute_bytes if seqs > 1 else 0
    logits = n * shape.vocab * 12 if lm_logits else 0
    return body + mask + logits


def training(shape: ModelShape, prec, tc, seqs: int, tokens: int, world: int = 1, sharded: bool = False,
             classifier: bool = False, reference_copy: bool = False) -> Memory:
    """One training loop's peak per process: weights, gradients, AdamW, autocast copies,
    a reference copy (rl in full fine-tuning) and activations for ``seqs`` sequences of
    ``tokens`` tokens in one forward/backward pass of this process.

    ``prec`` is a :class:`cai.training.Precision`; ``tc`` a stage config (``method``,
    ``lora_r``, ``lora_target_modules``, ``gradient_checkpointing``).
    """
    wb = DTYPE_BYTES[prec.weights]
    cb = DTYPE_BYTES[prec.compute or prec.weights]
    n = shape.pm_params if classifier else shape.params
    lora = tc.method == "lora"
    if lora:
        trained = shape.lora_params(tc.lora_r, tc.lora_target_modules) + (shape.hidden if classifier else 0)
        weights = n * DTYPE_BYTES[prec.frozen] + trained * wb
    else:
        trained, weights = n, n * wb
    parts = {"weights": weights, "gradients": trained * wb, "optimizer": 2 * trained * wb}
    if sharded and world > 1:
        parts = {k: v // world for k, v in parts.items()}
        parts["gathered layers"] = 2 * shape.layer_params * wb
    casts = bool(prec.compute) and not lora
    if casts:  # the output head's weight too (the PM's score head is one column)
        head = 0 if classifier else shape.vocab * shape.hidden
        parts["autocast copies"] = (shape.linear_params + head) * DTYPE_BYTES[prec.compute]
    if reference_copy and not lora:
        parts["reference"] = n * wb
    adapters = (tc.lora_r, tc.lora_target_modules, tc.lora_dropout > 0) if lora else None
    per_layer = layer_activations(shape, cb, wb, casts, seqs > 1, adapters)
    parts["activations"] = activations(shape, seqs, tokens, per_layer, tc.gradient_checkpointing, cb,
                                       lm_logits=not classifier)
    return Memory(parts, f"{seqs} sequences x {tokens} tokens per pass")


def no_grad_workspace(shape: ModelShape, dtype_bytes: int, seqs: int, tokens: int, int8: bool = False) -> int:
    """One layer's no-grad workspace over ``seqs`` x ``tokens``: its inputs and the MLP's
    (int8 layers also hold float temporaries of a layer's input while quantizing it per
    token, about four copies), and attention's scores of every query against every key, in
    float32 (about three copies: the scores, the mask, the softmax)."""
    return (seqs * tokens * (4 * shape.hidden + (6 if int8 else 2) * shape.intermediate) * dtype_bytes
            + 3 * seqs * shape.heads * tokens * tokens * 4)


def generation(shape: ModelShape, dtype_bytes: int, seqs: int, tokens: int, int8: bool = False,
               shared: int = 0) -> Memory:
    """An inference engine's peak: its weights (``engine.quantize=int8``: linear layers in
    one byte, the rest as loaded) and the KV cache of ``seqs`` sequences of ``tokens``.
    int8 layers are made from the loaded float model, so while loading the process holds
    the float weights; that phase counts where it is the larger. ``shared`` of the tokens
    are a prefix every sequence shares (few-shot demonstrations), which the local engine
    keeps once for the batch."""
    own = max(1, tokens - shared)
    # the prefill's workspace over the rows' own tokens (a shared prefix is attended by a fused kernel)
    work = no_grad_workspace(shape, dtype_bytes, seqs, own, int8)
    # a batch is prefilled in groups of similar length whose KV caches are then laid into the
    # batch's cache: while that happens the cache is held twice
    run = {"kv cache": 2 * shape.kv_bytes(seqs * own, dtype_bytes) + shape.kv_bytes(shared, dtype_bytes),
           "workspace": work}
    if int8:
        linear = shape.linear_params + (shape.vocab * shape.hidden if shape.tied else 0)  # the tied head gets its own int8 copy
        weights = shape.linear_params * 1 + (shape.params - shape.linear_params) * dtype_bytes + \
            (linear - shape.linear_params)
        loading = shape.params * dtype_bytes  # the float model before its layers are replaced
        extra = loading - (weights + sum(run.values()))
        if extra > 0:  # the peak is while loading: the total is the float model
            run["float weights while quantizing"] = extra
    else:
        weights = shape.params * dtype_bytes
    return Memory({"weights": weights, **run}, f"{seqs} sequences x {tokens} tokens"
                  + (f" ({shared} shared)" if shared else ""))


def frozen_model(params: int, dtype_bytes: int, name: str = "PM", shape: ModelShape | None = None,
                 seqs: int = 0, tokens: int = 0) -> Memory:
    """A model held for scoring only (the PM in rl and evaluate). With ``shape``, ``seqs``
    and ``tokens`` also its scoring pass's workspace where this phase has no other: one
    layer's inputs and MLP, and attention's scores (no KV cache: ``cai.reward.rewards``
    keeps none)."""
    if shape is None or not (seqs and tokens):
        return Memory({name: params * dtype_bytes})
    return Memory({name: params * dtype_bytes,
                   f"{name} scoring workspace": no_grad_workspace(shape, dtype_bytes, seqs, tokens)},
                  f"{seqs} sequences x {tokens} tokens")


# -- the device and the fit check ---------------------------------------------------------------


def device_memory(device: str) -> tuple[str, int | None]:
    """(what, bytes) of the memory a process can use on ``device``: each GPU's free memory
    (``torch.cuda.mem_get_info``) or, on a CPU, the machine's available RAM."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        if torch.cuda.is_available():
            index = int(str(device).split(":")[1]) if ":" in str(device) else torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(index)
            return f"GPU {index} ({torch.cuda.get_device_name(index)}): {free / GiB:.1f} GiB free of {total / GiB:.1f}", free
        return "no GPU visible", None
    available = _ram_available()
    return (f"RAM: {available / GiB:.1f} GiB available" if available else "RAM: unknown"), available


def _ram_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


#: The setting each stage's memory mostly depends on, for the refusal's hint.
HINTS = {
    "sft": "sft.batch_size (or sft.grad_accum), sft.max_length, sft.method=lora or sft.gradient_checkpointing=true",
    "preference_model": "preference_model.batch_size (or grad_accum), preference_model.max_length or "
                        "preference_model.method=lora",
    "dpo": "dpo.batch_size (or dpo.grad_accum), dpo.max_length, dpo.method=lora or dpo.gradient_checkpointing=true",
    "rl": "rl.method=lora, rl.micro_batch_size, rl.max_new_tokens or engine.batch_size",
    "critique_revision": "engine.batch_size or critique_revision.max_new_tokens",
    "feedback": "engine.batch_size or engine.score_batch_size",
    "evaluate": "engine.batch_size or engine.score_batch_size",
}


def check_fit(rows: list[dict], device: str, margin: float, available: int | None = None) -> None:
    """Refuse (one-line :class:`CaiError`) the first stage whose peak per process, plus the
    runtime's own, exceeds ``margin`` x the device's memory; silent where it is unknown."""
    if available is None:
        _, available = device_memory(device)
    if not available:
        return
    where = "the GPU has" if str(device).startswith("cuda") else "this machine has"
    for row in rows:
        mem = row.get("memory")
        if not mem:
            continue
        need = mem["stage_bytes"] + RUNTIME_BYTES
        if need > margin * available:
            hint = HINTS.get(row["stage"], f"{row['stage']} settings")
            raise CaiError(
                f"{row['stage']} needs ~{need / GiB:.1f} GiB per process but {where} {available / GiB:.1f} GiB"
                f"{'' if margin == 1 else f' (x memory_margin {margin:g})'}; set {hint}, or memory_check=false "
                "to run anyway"
            )


def process_count() -> int:
    """The processes of this launch (``WORLD_SIZE`` under accelerate launch / torchrun), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def fmt(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:.0f} MiB"

