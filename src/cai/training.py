"""The training kit shared by ``sft``, ``preference_model``, ``dpo`` and ``rl``.

The four run one loop, :func:`cai.loop.train`, each with its own objective. What else they
share lives here, once:

* the precision (:func:`resolve_precision`: float32 master weights and a bfloat16
  autocast where the hardware runs bfloat16 fast) and loading the starting model for
  training, with LoRA adapters when asked (:func:`load_trainable`, :func:`add_lora`);
* the optimizer and each step's example indices (:func:`optimizer_and_batches`), each
  process's share of a step's batch (:func:`process_share`), the optimizer step with
  clipping and the fp16 gradient scaler (:func:`optimizer_step`) and the learning-rate
  schedule (:func:`warmup_lr`);
* chat tokenization with assistant-only labels (:func:`encode_chat`), padding and the
  losses' building blocks (:func:`token_loss`, :func:`sequence_logprobs`,
  :func:`answer_logprobs`);
* the frozen reference of dpo and rl when training LoRA adapters: the same model with
  its adapters switched off (:func:`adapters_off`);
* resumable checkpoints that hold no pickle (:func:`save_checkpoint`, :func:`resume`),
  the NaN guard (:func:`check_finite`) and the final ``save_pretrained``, merged and in
  the run's dtype (:func:`save_trained_model`).

The optimizer settings are the flat fields of ``cai.config.OptimizerConfig`` /
``TrainingConfig``, which every training stage's config extends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from cai.errors import CaiError
from cai.layout import MODEL, POINTS, output_path

IGNORE = -100


def encode_chat(tok, messages: list[dict], max_length: int) -> dict | None:
    """Token ids and labels for a conversation; only the final assistant turn is learned.

    The prefix is the chat-template rendering of every turn before the last with the
    assistant cue; the target is what the full rendering adds after it (the answer and
    its end-of-turn token). Returns None when the prefix leaves no room for a target.
    """
    from cai.engines.base import defang, special_strings

    if not messages or messages[-1]["role"] != "assistant":
        raise CaiError("a training conversation must end with an assistant turn")
    specials = special_strings(tok)
    messages = [{**m, "content": defang(m["content"], specials)} for m in messages]
    prefix = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(p_ids), len(f_ids)) and p_ids[k] == f_ids[k]:
        k += 1
    f_ids = f_ids[:max_length]
    if k >= len(f_ids):
        return None
    labels = [IGNORE] * k + f_ids[k:]
    return {"input_ids": f_ids, "labels": labels}


def pad_batch(examples: list[dict], pad_id: int, device) -> dict:
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def token_loss(logits, labels):
    """Mean cross-entropy over the labelled tokens (labels shifted inside)."""
    import torch.nn.functional as F

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE)


def batches_for_epochs(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Shuffled index batches covering ``epochs`` passes (a fractional last pass is cut)."""
    order: list[int] = []
    rng = random.Random(seed)
    full = math.ceil(epochs)
    for _ in range(full):
        idx = list(range(n))
        rng.shuffle(idx)
        order += idx
    order = order[: max(1, round(n * epochs))]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def optimizer_and_batches(accelerator, model, tc, n: int, seed: int):
    """The shared set-up of a training loop: AdamW over the trainable weights, both prepared
    by accelerate, and each optimizer step's example indices (shuffled batches of
    ``tc.batch_size`` over ``tc.epochs``, cut at ``tc.max_steps``). ``tc`` is a stage's
    config (sft, preference_model, dpo). Returns (model, optimizer, params, batches).
    """
    import torch

    model.train()
    sharded = wants_sharding(accelerator, tc)
    if sharded:
        model = shard(model, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    if not sharded:  # sharded: FSDP2 already reduces the gradients (accelerate would add DDP on top)
        model, optimizer = accelerator.prepare(model, optimizer)
    batches = batches_for_epochs(n, tc.batch_size, tc.epochs, seed)
    if tc.max_steps is not None:
        batches = batches[: tc.max_steps]
    return model, optimizer, params, batches


# -- sharding (FSDP2) --------------------------------------------------------------------------


def wants_sharding(accelerator, tc) -> bool:
    """Whether to shard here: ``tc.sharding == 'fsdp'`` in several processes, unless accelerate
    already does (``accelerate launch`` with an FSDP config on GPUs; on a CPU it does not)."""
    from accelerate.utils import DistributedType

    return (getattr(tc, "sharding", "none") == "fsdp" and accelerator.num_processes > 1
            and accelerator.distributed_type != DistributedType.FSDP)


def shard(model, accelerator):
    """``model`` sharded over the processes with PyTorch FSDP2: ``fully_shard`` on each decoder
    layer (the model's ``_no_split_modules``) and on the whole, over a 1-D device mesh (gloo
    on a CPU). Each process then holds 1/N of the weights, gradients and AdamW state; a
    layer's weights are gathered whole only while it runs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise CaiError(f"sharding=fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) "
                       "to shard by; use sharding=none")
    device = accelerator.device
    model.to(device)
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    accelerator.print(f"sharded with FSDP2 over {accelerator.num_processes} processes: {len(layers)} "
                      f"{'/'.join(sorted(names))} and the whole model")
    return model


def is_sharded(model) -> bool:
    """Whether ``model``'s weights are sharded over the processes (DTensor parameters: FSDP2,
    ours or accelerate's)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _trained_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_state_dict(model) -> dict | None:
    """A sharded model's whole ``state_dict`` on the main process's CPU (every process must call
    it: the shards are gathered; the others get an empty dict); None for an unsharded model."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights (the output head on the embeddings) are one parameter under two names: keep the first
    first, seen = set(), set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            first.add(name)
    return {k: v for k, v in full.items() if k in first}


def process_share(batch: list, rank: int, world: int) -> tuple[list, float]:
    """This process's items of a step's batch, ``batch[rank::world]``, and their weight.

    A batch can be smaller than the process count (the last one of an epoch often is). A
    process left with nothing still has to run forward and backward, or the others wait
    forever in the gradient all-reduce: it takes the batch's first item with weight 0,
    so its gradient is zero and the step is the batch's alone, whatever the process count.
    """
    mine = batch[rank::world]
    return (mine, 1.0) if mine else (batch[:1], 0.0)


def optimizer_step(accelerator, optimizer, scaler, params, max_grad_norm: float) -> None:
    """Clip the gradients to ``max_grad_norm``, step and zero them. With fp16-mixed the
    gradient scaler unscales first and skips a step whose gradients overflowed; otherwise
    ``scaler`` is disabled and passes everything through."""
    scaler.unscale_(optimizer)
    accelerator.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def check_finite(value, step: int, where: Path, what: str = "training loss") -> None:
    """Stop with a clear error when ``value`` (a scalar or any tensor) holds NaN or inf."""
    import torch

    bad = value[~torch.isfinite(value)] if value.dim() else (value if not torch.isfinite(value) else None)
    if bad is not None and bad.numel():
        raise CaiError(
            f"{what} is {float(bad.detach().reshape(-1)[0])} at step {step}; stopped. The last good checkpoint is in "
            f"{where} (lower the learning rate or check the data)"
        )


# -- precision --------------------------------------------------------------------------------

#: The ``dtype`` setting of every training stage (``OptimizerConfig.dtype``).
PRECISIONS = ("auto", "float32", "bf16-mixed", "bfloat16", "fp16-mixed")
#: Set to 1 to train in bfloat16 on hardware without native bfloat16 (slow, but allowed).
FORCE_ENV = "CAI_ALLOW_SLOW_DTYPE"


@dataclass(frozen=True)
class Precision:
    """How a training loop stores and computes, resolved from a stage's ``dtype`` setting.

    * ``weights``: the trained weights' dtype, and so AdamW's state's: float32 (master
      weights) except in pure ``bfloat16``;
    * ``compute``: the autocast dtype of forward and backward passes (None: no autocast);
    * ``frozen``: weights that are never updated (LoRA's base model, the PM in rl);
    * ``saved``: the saved model's dtype (bfloat16 for a bf16 run).
    """

    name: str  # float32 | bf16-mixed | bfloat16 | fp16-mixed
    device_type: str  # cpu | cuda | ...

    @property
    def weights(self) -> str:
        return "bfloat16" if self.name == "bfloat16" else "float32"

    @property
    def compute(self) -> str | None:
        return {"bf16-mixed": "bfloat16", "fp16-mixed": "float16"}.get(self.name)

    @property
    def frozen(self) -> str:
        return self.compute or self.weights

    @property
    def saved(self) -> str:
        return self.compute or self.weights

    def autocast(self):
        """The forward/backward context: torch autocast in ``compute``, or nothing."""
        import torch

        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.compute))

    def grad_scaler(self):
        """A gradient scaler, enabled for fp16-mixed only (float16 gradients underflow)."""
        import torch

        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16-mixed")


def resolve_precision(setting: str, device, field: str, log=print, planning: bool = False) -> Precision:
    """The :class:`Precision` of a stage's ``dtype`` setting (``field`` names it) on ``device``.

    'auto' is bf16-mixed where the hardware computes bfloat16 natively
    (:func:`cai.hardware.bf16_fast`) and float32 elsewhere. bfloat16 chosen explicitly on
    a CPU or GPU without it is refused, unless ``CAI_ALLOW_SLOW_DTYPE=1``; pure bfloat16
    is allowed with a warning, since most small AdamW updates round away in it.
    ``planning``: an estimate for a device that may be another machine's (a GPU config
    planned on a CPU login node): a GPU that is not here is taken to have bfloat16, as
    every GPU from Ampere on does; the run itself checks the real one.
    """
    import torch

    from cai.hardware import bf16_fast, describe_cpu

    kind = getattr(device, "type", None) or str(device).split(":")[0]
    fast = bf16_fast(device) or (planning and kind == "cuda" and not torch.cuda.is_available())
    name = ("bf16-mixed" if fast else "float32") if setting == "auto" else setting
    if name not in PRECISIONS[1:]:
        raise CaiError(f"config field '{field}' must be one of {', '.join(PRECISIONS)}; got {setting!r}")
    if name in ("bf16-mixed", "bfloat16") and not fast and kind in ("cpu", "cuda") \
            and os.environ.get(FORCE_ENV, "") not in ("1", "true", "yes"):
        where, slow = (
            (f"this CPU has no native bfloat16 ({describe_cpu()})", "about 400x slower than in float32")
            if kind == "cpu" else
            ("this GPU has no native bfloat16 (compute capability below 8.0)", "emulated, slower than float16")
        )
        raise CaiError(
            f"config field '{field}={setting}': {where}, so training would run {slow}; use {field}=auto "
            f"(float32 here{'' if kind == 'cpu' else ' or fp16-mixed'}) or set {FORCE_ENV}=1 to force it"
        )
    if name == "bfloat16":
        log(f"warning: {field}=bfloat16 trains pure bfloat16 weights: AdamW updates smaller than about 1/256 of a "
            "weight round away (at a learning rate near 1e-6 most of them do); bf16-mixed keeps float32 master weights")
    return Precision(name, kind)


# -- the starting model, LoRA, the reference ---------------------------------------------------

#: Names a sequence classifier's head goes by (the PM's score head is trained in full).
HEAD_NAMES = ("score", "classifier")


def load_trainable(path: str, tc, device, trust_remote_code: bool, model_cls, stage: str, log=print,
                   seed: int | None = None, **kwargs):
    """The starting model of a training loop (on the CPU: accelerate moves it), its tokenizer
    and the run's :class:`Precision` (from ``tc.dtype``; ``tc`` is the stage's config).

    Full fine-tuning loads the weights in ``Precision.weights`` (float32 masters unless pure
    bfloat16). LoRA (``tc.method == 'lora'``) loads the frozen base in the compute dtype and
    trains float32 adapters on it (:func:`add_lora`). ``tc.gradient_checkpointing``
    recomputes activations in the backward pass instead of keeping them. ``seed`` seeds
    torch, numpy and ``random`` first, so what is drawn here (a new score head, LoRA's
    adapters) is the same in every run and process, whatever ran before in the process.
    """
    from cai.models import load_model_and_tokenizer

    if seed is not None:
        import transformers

        transformers.set_seed(seed)

    prec = resolve_precision(tc.dtype, device, f"{stage}.dtype", log)
    model, tok, _ = load_model_and_tokenizer(
        path, device="cpu", dtype=prec.frozen if tc.method == "lora" else prec.weights,
        trust_remote_code=trust_remote_code, model_cls=model_cls, **kwargs,
    )
    if tc.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.method == "lora":
        model = add_lora(model, tc, stage, prec)
    return model, tok, prec


def linear_names(model) -> set[str]:
    """The last name part of every linear layer (what LoRA's ``target_modules`` match)."""
    import torch

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}


def add_lora(model, tc, stage: str, prec: Precision):
    """``model`` with peft LoRA adapters (``tc.lora_*``) on ``tc.lora_target_modules``;
    a sequence classifier (the PM) also trains its whole score head (``modules_to_save``).
    The trained weights are kept in ``prec.weights`` (float32 masters)."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = list(tc.lora_target_modules)
    if targets != ["all-linear"]:
        have = linear_names(model)
        missing = [t for t in targets if t not in have]
        if missing:
            raise CaiError(
                f"config field '{stage}.lora_target_modules': this model has no module named {', '.join(missing)}; "
                f"its linear layers are {', '.join(sorted(have))} (or use all-linear)"
            )
    classifier = "ForSequenceClassification" in type(model).__name__
    heads = [h for h in HEAD_NAMES if any(n.rsplit(".", 1)[-1] == h for n, _ in model.named_modules())]
    model = get_peft_model(model, LoraConfig(
        r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="SEQ_CLS" if classifier else "CAUSAL_LM", modules_to_save=heads[:1] if classifier else None,
    ))
    keep = getattr(torch, prec.weights)
    for p in model.parameters():
        if p.requires_grad and p.dtype != keep:
            p.data = p.data.to(keep)
    return model


def is_lora(model) -> bool:
    """Whether ``model`` is a peft model (LoRA adapters on a frozen base)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def adapters_off(model):
    """The frozen reference of a LoRA policy: ``with adapters_off(policy):`` runs the same
    model with its adapters switched off (peft's ``disable_adapter``), which is exactly
    the starting model, so no second copy is kept. A no-op for a model without adapters."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


def warmup_lr(base: float, warmup_steps: int, step: int) -> float:
    """Linear warmup to ``base``, then constant (the paper's schedule)."""
    return base * min(1.0, (step + 1) / warmup_steps) if warmup_steps else base


def sequence_logprobs(logits, labels):
    """Sum of log p(token) over each row's labelled tokens (labels shifted inside).

    The log-likelihood of an answer under the model, as DPO and policy gradients need it;
    computed through ``cross_entropy`` so no full-vocabulary log-softmax is kept around.
    """
    import torch.nn.functional as F

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    return -nll.view(labels.shape).sum(-1)


def trainable_weights(model) -> dict:
    """The weights an optimizer updates, by name (everything in full fine-tuning; the
    adapters and the PM's score head with LoRA)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model, optimizer, step: int, extra: dict, scaler=None, main: bool = True) -> None:
    """Save the trained weights, the optimizer state and the loop's state, atomically (a temp
    folder renamed into place). Nothing is pickled, so loading a checkpoint runs no code:

    * ``weights.safetensors``: :func:`trainable_weights` (float32 masters in a mixed run);
    * ``optimizer.safetensors``: AdamW's state tensors, keyed ``<param index>.<name>``;
    * ``trainer_state.json``: the step, the optimizer's param groups and non-tensor state,
      the fp16 gradient scaler's state and ``extra`` (plain JSON values).

    Every process calls it; only the ``main`` one writes. A sharded model's weights and
    AdamW state are gathered whole first (every process takes part), so the checkpoint is
    the same whatever the sharding and resumes with any process count.
    """
    import torch
    from safetensors.torch import save_file

    weights, opt = _full_training_state(model, optimizer)
    if not main:
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in weights.items()}, str(tmp / "weights.safetensors"))
    tensors, scalars = {}, {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None, **extra}
    (tmp / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _full_training_state(model, optimizer) -> tuple[dict, dict]:
    """The trained weights by name and the optimizer's ``state_dict`` (keyed by parameter
    index), gathered whole from the shards of a sharded model (a collective call)."""
    if not is_sharded(model):
        return trainable_weights(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = _trained_names(model)
    full = get_model_state_dict(model, options=options)
    opt = get_optimizer_state_dict(model, optimizer, options=options)
    index = {n: i for i, n in enumerate(names)}
    return ({n: full[n] for n in names if n in full},
            {"state": {index[n]: v for n, v in opt.get("state", {}).items()},
             "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in opt.get("param_groups", [])]})


def _load_full_training_state(model, optimizer, weights: dict, opt: dict) -> None:
    """Load whole weights and an index-keyed optimizer state into a sharded model (each
    process keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = _trained_names(model)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, {
        "state": {names[i]: v for i, v in opt["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt["param_groups"]],
    }, options=options)


def resume(folder: Path, model, optimizer, total_steps: int, log, stage: str, scaler=None) -> tuple[int, dict | None]:
    """Where a loop starts: ``(0, None)``, or the step and trainer state of the checkpoint an
    interrupted run of the same configuration left in ``folder`` (weights, optimizer and
    gradient scaler state loaded into ``model``, ``optimizer`` and ``scaler``)."""
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.is_dir():
        # killed between save_checkpoint's two renames: the previous checkpoint, whole, is set aside
        os.replace(old, folder)
    state = load_checkpoint(folder, model, optimizer, total_steps, scaler) if folder.exists() else None
    if state is None:
        return 0, None
    log(f"[{stage}] resuming from checkpoint at step {state['step']}/{total_steps}")
    return state["step"], state


def load_checkpoint(folder: Path, model, optimizer, total_steps: int | None = None, scaler=None) -> dict | None:
    """The trainer state of a checkpoint, with its weights and optimizer state loaded.

    None, touching nothing, when there is no checkpoint of this format (an older one's
    pickled ``trainer_state.pt`` is never opened), when it was made for another number of
    steps (the config changed), or when its weights do not fit the model's trained ones:
    then training starts over rather than mixing weights.
    """
    import torch
    from safetensors.torch import load_file

    files = [folder / f for f in ("trainer_state.json", "weights.safetensors", "optimizer.safetensors")]
    if not all(f.is_file() for f in files):
        return None
    try:
        trainer = json.loads(files[0].read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if total_steps is not None and trainer.get("total_steps") != total_steps:
        return None
    saved, own = load_file(str(files[1])), trainable_weights(model)
    if set(saved) != set(own) or any(saved[n].shape != p.shape for n, p in own.items()):  # a DTensor's shape is whole
        return None
    state: dict[int, dict] = {}
    for key, value in [*load_file(str(files[2])).items(), *trainer.pop("optimizer_scalars").items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in trainer.pop("param_groups")]  # JSON made AdamW's betas a list
    if is_sharded(model):
        _load_full_training_state(model, optimizer, saved, {"state": state, "param_groups": groups})
    else:
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(saved[n])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scaler is not None and trainer.get("scaler"):
        scaler.load_state_dict(trainer["scaler"])
    return trainer


def answer_logprobs(model, batch: dict, entropy: bool = False):
    """One forward pass: each row's summed log-probability of its labelled tokens.

    Logits are kept only from the earliest answer position on (``logits_to_keep``), so the
    vocabulary projection is not paid over the prompts. With ``entropy``, also returns the
    summed entropy of the model's next-token distribution at the labelled positions and
    their count (no gradient through it: it is a diagnostic).
    """
    import torch

    labels = batch["labels"]
    labelled = labels != IGNORE
    first = int(labelled.float().argmax(-1).min()) if bool(labelled.any()) else 0
    keep = labels.size(1) - max(first - 1, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                   use_cache=False).logits
    logits = logits[:, -keep:, :]
    kept = labels[:, -keep:]
    logp = sequence_logprobs(logits, kept)
    if not entropy:
        return logp
    with torch.no_grad():
        mask = kept[:, 1:] != IGNORE
        sel = torch.log_softmax(logits[:, :-1, :][mask].float(), dim=-1)
        ent = -(sel.exp() * sel).sum(-1)
    return logp, float(ent.sum()), int(mask.sum())


def save_trained_model(folder: Path, model, tok, stage: str, base: str, config, seed: int, prec: Precision,
                       state_dict: dict | None = None) -> None:
    """The trained model as ``folder/model`` (``save_pretrained`` weights in ``prec.saved``:
    bfloat16 for a bf16 run, plus the tokenizer and ``cai_training.json``: the stage, its
    starting model, resolved config and precision, so the artifact says how it was made).
    A LoRA model also saves its adapter alone in ``folder/adapter`` and is merged first.
    Call it last: the model is merged and cast in place. A sharded model passes its
    gathered ``state_dict`` (:func:`full_state_dict`): that is what is saved."""
    import dataclasses

    import torch

    from cai.io import write_json

    out = folder / MODEL
    dtype = getattr(torch, prec.saved)
    if state_dict is not None:
        model.save_pretrained(out, state_dict={k: v.to(dtype) if v.is_floating_point() else v
                                               for k, v in state_dict.items()})
    else:
        if is_lora(model):
            model.save_pretrained(folder / "adapter")
            model = model.merge_and_unload()
        model.to(dtype)
        model.save_pretrained(out)
    tok.save_pretrained(out)
    write_json(out / "cai_training.json", {
        "stage": stage, "base_model": base, "config": dataclasses.asdict(config), "seed": seed,
        "precision": prec.name,
    })


# -- frontier points: policies kept along training ---------------------------------------------

# Where a training stage keeps its frontier points: ``<stage>/points/step-NNNNNN/`` and the
# index, ``<stage>/points/index.json`` (cai.layout).


def point_steps(total_steps: int, n: int) -> list[int]:
    """The optimizer steps after which a frontier point is kept: ``ceil(i * total / n)`` for
    i = 1..n, without repeats (fewer when there are fewer steps than points); the last is
    always ``total_steps`` (the final model). ``n = 0``: none."""
    if n <= 0 or total_steps <= 0:
        return []
    return sorted({-(-i * total_steps // n) for i in range(1, n + 1)})


def point_saves(total_steps: int, n: int, method: str) -> int:
    """Whole-model saves the frontier points add to a stage, for ``cai plan``: every point
    but the last (the stage's model/); none for LoRA, whose points are adapters of a few MB."""
    return 0 if method == "lora" else max(0, len(point_steps(total_steps, n)) - 1)


def point_dir(folder: Path, step: int) -> Path:
    return Path(folder) / POINTS / f"step-{step:06d}"


def save_point(folder: Path, step: int, model, tok, prec: Precision, state_dict: dict | None = None) -> Path:
    """Keep the policy after ``step`` as a frontier point, ``folder/points/step-NNNNNN``, in
    ``save_pretrained`` format: the LoRA adapter alone (a few MB), or the whole model in
    ``prec.saved`` with its tokenizer. Written to a temp folder renamed into place, so a
    resumed run that redoes the step replaces it and a crash never leaves half a point.
    A sharded model passes its gathered ``state_dict`` (:func:`full_state_dict`)."""
    import torch

    out = point_dir(folder, step)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_lora(model):
        model.save_pretrained(tmp)
    else:
        dtype = getattr(torch, prec.saved)
        full = state_dict if state_dict is not None else model.state_dict()
        state = {k: v.detach().to(dtype) for k, v in full.items()}
        model.save_pretrained(tmp, state_dict=state)
        tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def write_points_index(folder: Path, run_dir: Path, stage: str, base: str, lora: bool, rows: list[dict],
                       start: str | None) -> None:
    """``folder/points/index.json``: every point kept (``rows``: step, samples seen, KL when
    known), where it is (``points/step-NNNNNN`` or ``model`` for the last), whether it is an
    adapter and the base model it applies to (relative to the run directory when inside it,
    so the run can move), and the policy the stage started from (``start``, e.g. ``sl-cai``).
    Built from the loop's history at the end, so a resumed run neither loses nor repeats one."""
    from cai.io import write_json

    last = max((r["step"] for r in rows), default=None)
    points = []
    for r in rows:
        final = r["step"] == last
        path = "model" if final else f"{POINTS}/step-{r['step']:06d}"
        if not final and not (Path(folder) / path).is_dir():
            raise CaiError(f"{Path(folder) / path}: frontier point of step {r['step']} is missing; rerun stage '{stage}'")
        points.append({**r, "path": path, "adapter": lora and not final})
    try:
        base_rel = str(Path(base).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        base_rel = None
    for stale in (Path(folder) / POINTS).glob("*.tmp") if (Path(folder) / POINTS).is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    (Path(folder) / POINTS).mkdir(parents=True, exist_ok=True)  # no intermediate point: only the index
    write_json(output_path(folder, stage, "points"), {
        "schema": 1, "stage": stage, "start": start, "base": base_rel or base, "base_in_run": base_rel is not None,
        "points": points,
    })
