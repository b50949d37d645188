"""The local engine: transformers models on CPU or GPU.

Generation runs our own short decode loop over a KV cache rather than
``model.generate``, for four reasons that matter to the pipeline:

* every row samples with its own seeded generator (``request_seed``), so an answer
  does not depend on which other requests shared its batch. The request cache and a
  resumed run therefore see the same text a fresh run would;
* rows that reach end-of-sequence leave the batch (once a quarter of it has finished,
  since each removal copies the KV cache), so a batch does not keep paying for its
  finished members while one long answer completes;
* prompts are sorted by length and left-padded, so padding stays small;
* a prefix that every row of a batch shares (the few-shot demonstrations) runs once,
  and on the CPU its KV cache is kept once and attended by every row
  (:mod:`cai.engines.shared_prefix`) instead of being copied per row.

``choice_logprobs`` scores options in batched forward passes (no generation) and
keeps logits only at the option positions.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
import cai.engines.hf_compat as hf_compat
import cai.engines.shared_prefix as shared_prefix
from dataclasses import dataclass

from cai.engines.base import (
    Batching,
    Conversation,
    Engine,
    OnResult,
    Progress,
    SamplingParams,
    finished,
    render_chat,
    request_seed,
    special_strings,
)
from cai.errors import CaiError
from cai.models import load_model_and_tokenizer


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _prefix_batches(seqs: list[list[int]], size: int) -> list[list[int]]:
    """The rows' indices in batches of at most ``size`` whose rows share long starts.

    Rows are taken in token order, so rows with a common start sit together (a judge's
    questions about one prompt share the whole conversation up to the first answer), and a
    batch is closed where the next row would shorten the batch's common start by more than
    it saves: a batch of ``k`` rows whose common start is ``c`` tokens runs ``c`` of them
    once instead of ``k`` times (:meth:`LocalEngine._prefill`)."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    common = 0
    for i in order:
        if batch:  # in token order, a batch's common start is its least adjacent one
            c = min(common, _common_prefix_len([seqs[batch[-1]], seqs[i]]))
            if len(batch) >= size or len(batch) * c < (len(batch) - 1) * common:
                batches.append(batch)
                batch = []
            else:
                common = c
        if not batch:
            common = len(seqs[i])
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def _length_batches(seqs: list[list[int]], size: int) -> list[list[int]]:
    """The rows' indices longest first, ``size`` at a time (each batch pads to lengths close
    to its own)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def _quantize_int8(model, device: str, calibration_ids=None):
    """int8 linear layers with a scale per token (:mod:`cai.engines.int8`): faster sampling
    on the CPU, and a row's answer does not depend on its batch (docs/engine.md). Each
    layer's largest input channels on ``calibration_ids`` stay in float."""
    from cai.engines.int8 import quantize_linear_layers

    if not str(device).startswith("cpu"):
        raise CaiError(f"engine.quantize=int8 runs on the CPU only; device is '{device}' (use quantize=none)")
    from cai.hardware import return_free_memory

    # The float layers freed as they are replaced go back to the OS as they go: otherwise
    # glibc keeps them, the int8 copies land elsewhere, and the engine's load peaks at the
    # float model plus its int8 copy and the loader's leftovers (+998 against +548 MiB,
    # measured on an SFT checkpoint of the embedded model).
    # After every 4th block: a trim costs ~13 ms (62 blocks on the embedded model: 0.8 s a
    # load), and what 4 blocks' float layers hold back meanwhile is small beside the model.
    blocks = itertools.count(1)

    def trim_every_4th() -> None:
        if next(blocks) % 4 == 0:
            return_free_memory(collect=False)

    model = quantize_linear_layers(model, calibration_ids=calibration_ids, after_module=trim_every_4th)
    return_free_memory()
    return model


def _checkpoint_stamp(path: str) -> str:
    p = Path(path)
    parts = [path]
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


@dataclass
class TokenSamples:
    """One conversation's sampled answers as tokens (:meth:`LocalEngine.sample_tokens`)."""

    prompt_ids: list[int]  # the rendered prompt, ready for the first answer token
    answer_ids: list[list[int]]  # each sample's tokens, its stop token included if sampled
    texts: list[str]  # each sample decoded, special tokens dropped


class LocalEngine(Engine):
    """transformers models on CPU or GPU, loaded from a path or wrapped around a model in memory.

    Public beyond the protocol: :meth:`for_model` (an engine on a model you hold, e.g.
    RL's live policy), :meth:`sample_tokens` (sampled answers as tokens, for RL),
    :meth:`render`/:meth:`encode` (the chat template and tokenizer it uses), and the
    ``model`` and ``tok`` it runs.
    """

    def __init__(
        self,
        model_path: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        score_batch_size: int = 16,
        trust_remote_code: bool = False,
        quantize: str = "none",
        min_shared_prefix: int = 16,
        model=None,
        tokenizer=None,
        batch_invariant: bool = False,
    ):
        import torch

        if model is None:
            model, tokenizer, device = load_model_and_tokenizer(model_path, device, dtype, trust_remote_code)
        else:
            device = str(next(model.parameters()).device)
        self.model = model.eval()
        self.tok = tokenizer
        self.device = device
        # batch_invariant: each request runs alone, its prompt prefilled whole (no shared
        # prefix, no kept rows), so its float path never depends on the other requests
        self.batch_invariant = batch_invariant
        self.batch_size = 1 if batch_invariant else batch_size
        self.min_shared_prefix = min_shared_prefix
        self.score_batch_size = 1 if batch_invariant else score_batch_size
        self._shared_ok: bool | None = None  # set by _shared_prefix_ok on first use
        self._continuations = shared_prefix.Continuations()  # the last generated rows' KV caches
        self.reused_tokens = 0  # prompt tokens taken from kept rows instead of prefilled
        self.torch = torch
        if getattr(self.tok, "chat_template", None) is None:
            raise CaiError(
                f"model '{model_path}' has no chat template; cai needs an instruction-tuned "
                "chat model (or add a chat_template to its tokenizer_config.json)"
            )
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tok.pad_token_id
        self.specials = special_strings(self.tok)
        hf_compat.check()
        self._cache_kw = hf_compat.cache_keyword(self.model)
        self.identity = f"local:{model_path}:{_checkpoint_stamp(model_path)}:{dtype}"
        if quantize == "int8":
            # The shared-prefix check compares two ways of computing attention, which int8
            # does not change; on the int8 model the comparison itself fails: per-token
            # rounding turns the two paths' last-bit float differences into log-prob
            # differences of ~1-3 (docs/engine.md), so it runs on the float model first. The
            # float model then reads the calibration conversation, which picks each layer's
            # outlier input channels (kept in float).
            from cai.engines.int8 import CALIBRATION, SCHEME

            self._shared_prefix_ok()
            try:
                text = self.render(CALIBRATION)
            except Exception:  # a template that refuses a system turn (or any of ours): the plain text
                text = "\n\n".join(m["content"] for m in CALIBRATION)
            calibration = torch.tensor([self.encode(text)], device=device)
            self.model = _quantize_int8(model, device, calibration).eval()
            self.identity += f":{SCHEME}"

    @staticmethod
    def batching_for(batch_size: int, score_batch_size: int, shared_prefix_once: bool = True) -> Batching:
        """Length-sorted batches of ``batch_size`` rows to generate and ``score_batch_size``
        questions to score; a prefix every row of a batch shares runs once (shared_prefix)."""
        return Batching(generate=batch_size, score=score_batch_size, shared_prefix_once=shared_prefix_once)

    @property
    def batching(self) -> Batching:
        return self.batching_for(self.batch_size, self.score_batch_size, not self.batch_invariant)

    @classmethod
    def for_model(cls, model, tokenizer, batch_size: int = 32, name: str = "in-memory") -> "LocalEngine":
        """An engine around a model already in memory; it samples with the model's weights as
        they are at each call (an optimizer step between calls is seen by the next one)."""
        return cls(name, model=model, tokenizer=tokenizer, batch_size=batch_size)

    # -- text <-> tokens ----------------------------------------------------------

    def render(self, conv: Conversation) -> str:
        """The chat-template text of a conversation, ready for the next token."""
        return render_chat(self.tok, conv, self.specials)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _left_pad(self, seqs: list[list[int]]):
        torch = self.torch
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation ---------------------------------------------------------------

    def generate(self, conversations, params: SamplingParams, progress: Progress | None = None,
                 on_result: OnResult | None = None):
        def texts(ids: list[list[int]]) -> list[str]:
            return [self.tok.decode(t, skip_special_tokens=True).strip() for t in ids]

        report = None if on_result is None else (lambda ci, ids: on_result(ci, texts(ids)))
        return [texts(row) for row in self.generate_ids(conversations, params, progress, on_ids=report)]

    def count_tokens(self, conversation: Conversation) -> int:
        return len(self.encode(self.render(conversation)))

    def generate_ids(self, conversations, params: SamplingParams, progress: Progress | None = None,
                     keep_stop: bool = False, on_ids=None) -> list[list[list[int]]]:
        """Like :meth:`generate`, but the sampled token ids. ``keep_stop`` appends the
        end-of-sequence token when a row sampled one (RL needs every sampled token);
        ``on_ids(index, ids)`` is called as each conversation's samples are complete."""
        rows = []  # (conversation index, sample index, token ids, seed)
        samples = params.n if params.temperature > 0 else 1
        for ci, conv in enumerate(conversations):
            ids = self.encode(self.render(conv))
            for j in range(samples):
                rows.append((ci, j, ids, request_seed(params.seed, conv, j)))
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][2]))
        tokens: dict[tuple[int, int], list[int]] = {}
        left = {ci: samples for ci in range(len(conversations))}

        def result(ci: int) -> list[list[int]]:
            if params.temperature > 0:
                return [tokens[(ci, j)] for j in range(params.n)]
            return [tokens[(ci, 0)]] * params.n

        def row_done(row, out: list[int]) -> None:  # report a conversation once all its samples finished
            ci, j = row[0], row[1]
            tokens[(ci, j)] = out
            left[ci] -= 1
            if left[ci] == 0:
                finished(ci, result(ci), progress, on_ids)

        kept = shared_prefix.Continuations(self._continuations.budget)
        for start in range(0, len(order), self.batch_size):
            batch = [rows[r] for r in order[start:start + self.batch_size]]
            self._decode_batch(
                [b[2] for b in batch], [b[3] for b in batch], params,
                on_done=lambda k, out, batch=batch: row_done(batch[k], out), keep_stop=keep_stop,
                store=None if self.batch_invariant else kept,  # batch_invariant never continues a kept row
            )
        self._continuations = kept
        return [result(ci) for ci in range(len(conversations))]

    def sample_tokens(self, conversations, params: SamplingParams) -> list["TokenSamples"]:
        """Sample answers with the model's current weights and return them as tokens.

        For on-policy RL: each conversation's prompt token ids (the chat template
        rendered here) and ``params.n`` sampled answers as token ids, the stop token
        included when one was sampled, so a learner can score exactly what was sampled,
        plus their texts. The model is in eval mode while sampling and is returned to
        the mode it was in. Nothing is cached: the weights may change between calls.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            ids = self.generate_ids(conversations, params, keep_stop=True)
        finally:
            self.model.train(was_training)
        return [TokenSamples(self.encode(self.render(conv)), answers,
                             [self.tok.decode(a, skip_special_tokens=True).strip() for a in answers])
                for conv, answers in zip(conversations, ids)]

    def _prefill(self, seqs: list[list[int]], keep: int = 1, own: list[int] | None = None, share: str = "auto"):
        """Run the prompt tokens of a batch through the model, sharing their common start.

        Requests built from one template share a long token prefix (the system prompt and
        the few-shot demonstrations). That prefix is run once at batch size 1; only the
        differing suffixes are run per row, left-padded *after* the shared prefix. The
        prefix's KV cache is then either kept once and attended through
        :mod:`cai.engines.shared_prefix` (``share="auto"`` where the model passes that
        module's check; ``"shared"`` skips the check), or copied for every row
        (``"copy"``); ``"none"`` runs every row whole. ``"auto"`` shares only prefixes of
        at least ``min_shared_prefix`` tokens. Returns the last ``keep`` logits, the rows'
        own KV cache, their attention mask, the suffix token ids, the next position id of
        each row and the shared prefix (``None`` unless kept once). ``own[i]`` is how many
        final tokens of row i must stay outside the shared part (so their logits are
        computed).
        """
        torch = self.torch
        if self.batch_invariant and share == "auto":
            share = "none"
        cache = hf_compat.growing_cache()
        own = own or [1] * len(seqs)
        limits = [len(s) - o for s, o in zip(seqs, own)]
        shared = _common_prefix_len(seqs) if len(seqs) > 1 and share != "none" else 0
        shared = min(shared, min(limits))
        if share == "auto" and self._continuations.groups and self._shared_prefix_ok():
            # Continue from the last generated rows if their prefix covers this batch's.
            found = self._continuations.match(seqs, limits, self._weights_stamp(), min_prefix=shared)
            if found is not None:
                return self._prefill_continuing(seqs, keep, *found)
        if shared < self.min_shared_prefix and share == "auto":
            shared = 0
        prefix = None
        if shared:
            self.model(
                input_ids=torch.tensor([seqs[0][:shared]], device=self.device),
                position_ids=torch.arange(shared, device=self.device).view(1, -1),
                use_cache=True, logits_to_keep=1, **{self._cache_kw: cache},
            )
            if share == "shared" or (share == "auto" and self._shared_prefix_ok()):
                prefix = shared_prefix.SharedPrefix.from_cache(cache, seqs[0][:shared])
                cache = hf_compat.growing_cache()
            else:
                cache.batch_repeat_interleave(len(seqs))
        ids, mask = self._left_pad([s[shared:] for s in seqs])
        pos = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if prefix is not None:
            logits = self._prefill_rows(ids, mask, pos, cache, prefix, keep)
            return logits, cache, mask, ids, pos[:, -1:] + 1, prefix
        if shared:
            mask = torch.cat([mask.new_ones((len(seqs), shared)), mask], dim=1)
        out = self._forward(ids, mask, pos, cache, prefix, logits_to_keep=keep)
        return out.logits, cache, mask, ids, pos[:, -1:] + 1, prefix

    def _prefill_continuing(self, seqs, keep: int, shared: int, prefix, picks):
        """Prefill rows behind a kept prefix, each continuing from its kept row's KV cache.

        ``picks[i]`` is ``(kept row, r)``: the first ``r`` tokens of row i after the prefix
        are those of a row the engine generated last, so their keys and values are taken
        from it and only the rest of row i runs through the model.
        """
        torch = self.torch
        reused = [r for _, r in picks]
        width = max(reused)
        self.reused_tokens += sum(reused)
        past = None
        if width:
            first = next(row for row, r in picks if r)
            layers = len(first[1])
            k0 = first[1][0]
            keys = [k0.new_zeros((len(seqs), k0.shape[0], width, k0.shape[2])) for _ in range(layers)]
            values = [torch.zeros_like(k) for k in keys]
            past_mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
            for i, (row, r) in enumerate(picks):
                if r:
                    for layer in range(layers):
                        keys[layer][i, :, width - r:] = row[1][layer][:, :r]
                        values[layer][i, :, width - r:] = row[2][layer][:, :r]
                    past_mask[i, width - r:] = 1
            past = (keys, values, past_mask)
        ids, mask = self._left_pad([s[shared + r:] for s, r in zip(seqs, reused)])
        start = torch.tensor(reused, device=self.device).view(-1, 1) + shared
        pos = start + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = hf_compat.growing_cache()
        logits = self._prefill_rows(ids, mask, pos, cache, prefix, keep, past=past)
        full_mask = mask if past is None else torch.cat([past[2], mask], dim=1)
        return logits, cache, full_mask, ids, pos[:, -1:] + 1, prefix

    def _prefill_rows(self, ids, mask, pos, cache, prefix, keep: int, past=None, waste: float = 0.1):
        """Run the rows' own tokens behind a kept-once prefix, in groups of similar length.

        Left padding to the longest row wastes compute on every shorter one (the first
        answers of a batch run 42 to 149 tokens). Rows are grouped so that padding is at
        most ``waste`` of each group's tokens, each group runs with its own width, and
        the groups' KV caches are then laid into ``cache`` at the batch's full width,
        left-padded as ``mask`` says, ready for decoding. ``past`` holds keys, values
        (per layer, ``[rows, kv_heads, R, d]``) and mask ``[rows, R]`` of tokens each row
        already has before ``ids``; they are laid in front.
        """
        torch = self.torch
        lengths = mask.sum(-1).tolist()
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups, group = [], []
        for i in order:
            n, widest = len(group) + 1, lengths[group[0]] if group else lengths[i]
            if group and widest * n - sum(lengths[j] for j in group + [i]) > waste * widest * n:
                groups.append(group)
                group = []
            group.append(i)
        groups.append(group)
        if len(groups) == 1 and past is None:
            return self._forward(ids, mask, pos, cache, prefix, logits_to_keep=keep).logits
        width = ids.shape[1]
        past_width = 0 if past is None else past[2].shape[1]
        logits, parts = None, []
        for group in groups:
            rows = torch.tensor(group, device=self.device)
            w = max(lengths[i] for i in group)
            part = hf_compat.growing_cache()
            part_mask = mask[rows, width - w:]
            pw = 0 if past is None else int(past[2][rows].sum(-1).max())
            if pw:
                for layer, (k, v) in enumerate(zip(past[0], past[1])):
                    part.update(k[rows, :, past_width - pw:], v[rows, :, past_width - pw:], layer)
                part_mask = torch.cat([past[2][rows, past_width - pw:], part_mask], dim=1)
            out = self._forward(ids[rows, width - w:], part_mask, pos[rows, width - w:], part, prefix,
                                logits_to_keep=keep).logits
            if logits is None:
                logits = out.new_zeros((len(lengths), keep, out.shape[-1]))
            logits[rows, keep - out.shape[1]:] = out  # a group narrower than keep fills the right end
            parts.append((rows, pw, w, part))
        part_kv = [hf_compat.layer_kv(part) for _, _, _, part in parts]
        for layer in range(len(part_kv[0])):
            k0 = part_kv[0][layer][0]
            keys = k0.new_zeros((len(lengths), k0.shape[1], past_width + width, k0.shape[3]))
            values = torch.zeros_like(keys)
            for (rows, pw, w, _), kv in zip(parts, part_kv):
                k, v = kv[layer]
                keys[rows, :, past_width - pw:past_width] = k[:, :, :pw]
                values[rows, :, past_width - pw:past_width] = v[:, :, :pw]
                keys[rows, :, past_width + width - w:] = k[:, :, pw:]
                values[rows, :, past_width + width - w:] = v[:, :, pw:]
            cache.update(keys, values, layer)
        return logits

    def _weights_stamp(self):
        """Changes whenever the model's weights do (an optimizer step bumps their versions)."""
        return tuple((id(p), p._version) for p in self.model.parameters())

    def _keep_rows(self, store, cache, mask, prefix, rows_ids: list[list[int]], batch_rows: list[int]) -> None:
        """Copy the KV caches of the batch positions ``batch_rows`` into ``store``.

        ``rows_ids[k]`` are the token ids after the prefix that batch position k has fed
        (its prompt, then its generated tokens); a finished row may have fed more (its
        stop token, padding steps), which is cut off.
        """
        layers = hf_compat.layer_kv(cache)
        if prefix is None or not layers:
            return
        prefix_ids = prefix.token_ids
        weights = self._weights_stamp()
        token_bytes = sum(2 * keys[0, :, 0].numel() * keys.element_size() for keys, _ in layers)
        for k in batch_rows:
            where = mask[k].nonzero().view(-1)
            n = min(len(where), len(rows_ids[k]))
            if not store.has_room(n * token_bytes):
                return
            where = where[:n]
            keys = [lk[k][:, where] for lk, _ in layers]  # indexing copies
            values = [lv[k][:, where] for _, lv in layers]
            store.add(prefix_ids, prefix, list(rows_ids[k][:n]), keys, values, weights)

    def _forward(self, ids, mask, pos, cache, prefix, **kwargs):
        """One model call over the KV cache; through the shared prefix where there is one."""
        if prefix is None:
            return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                              **{self._cache_kw: cache}, **kwargs)
        prefix.set_valid(mask)
        with hf_compat.use_attention(self.model, shared_prefix.NAME):
            return self.model(input_ids=ids, position_ids=pos, use_cache=True,
                              **{self._cache_kw: cache, shared_prefix.KWARG: prefix}, **kwargs)

    def _shared_prefix_ok(self) -> bool:
        """Whether this engine keeps a batch's shared prefix once (on the CPU; checked once).

        Two rows of different lengths behind a 14-token common start go through the
        shared-prefix path and through plain full-sequence attention. The check passes
        if every attention layer took the shared path and the next-token log-probs
        agree (to 1e-3 of the largest |log-prob| in float32, 5e-2 otherwise).
        """
        if self._shared_ok is None and not str(self.device).startswith("cpu"):
            # Measured on an H200 (benchmarks/bench_shared_prefix.py, SmolLM2-135M shape,
            # batch 32, 1,160 shared tokens): 0.55x in bfloat16. GPU decoding is bound by
            # kernel launches, and the split attention launches more of them; there the
            # copied prefix with the fused SDPA kernel stays.
            self._shared_ok = False
        if self._shared_ok is None:
            torch = self.torch
            ids = self.encode("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 2)
            rows = [ids[:15], ids[:19]]
            try:
                with torch.inference_mode():
                    logits, _, _, _, _, prefix = self._prefill(rows, share="shared")
                    plain = self._prefill(rows, share="none")[0]
                layers = getattr(self.model.config, "num_hidden_layers", 0) or 0
                a = torch.log_softmax(logits[:, -1].float(), -1)
                b = torch.log_softmax(plain[:, -1].float(), -1)
                tol = (1e-3 if self.model.dtype == torch.float32 else 5e-2) * float(b.abs().max())
                every_layer = prefix is not None and layers > 0 and prefix.calls > 0 and prefix.calls % layers == 0
                self._shared_ok = bool(every_layer and float((a - b).abs().max()) <= tol)
            except shared_prefix.Unsupported:
                self._shared_ok = False
        return self._shared_ok

    def _decode_batch(self, seqs, seeds, params: SamplingParams, on_done=None, keep_stop: bool = False,
                      store=None) -> list[list[int]]:
        """Decode one batch; ``on_done(row, tokens)`` is called as each row finishes.

        With ``store`` (a :class:`~cai.engines.shared_prefix.Continuations`), each row's KV
        cache is kept there as it leaves the batch, for a later request that extends it.
        """
        torch = self.torch
        gens = None
        if params.temperature > 0:
            gens = []
            for s in seeds:
                g = torch.Generator(device=self.device)
                g.manual_seed(s % (2**63))
                gens.append(g)
        active = list(range(len(seqs)))  # batch position -> row
        done = [False] * len(seqs)
        out_tokens: list[list[int]] = [[] for _ in seqs]

        def fed(batch_rows):  # each batch position's tokens after the shared prefix, as fed so far
            n = len(prefix.token_ids) if prefix is not None else 0
            return [seqs[row][n:] + out_tokens[row] for row in batch_rows]

        with torch.inference_mode():
            logits, cache, mask, _, next_pos, prefix = self._prefill(seqs)
            for step in range(params.max_new_tokens):
                chosen = self._pick(logits[:, -1, :].float(), [gens[i] for i in active] if gens else None, params)
                for k, row in enumerate(active):
                    if done[row]:
                        continue
                    t = int(chosen[k])
                    if t in self.eos_ids:
                        done[row] = True
                        if keep_stop:
                            out_tokens[row].append(t)
                        if on_done:
                            on_done(row, out_tokens[row])
                    else:
                        out_tokens[row].append(t)
                keep = [k for k, row in enumerate(active) if not done[row]]
                if not keep or step + 1 == params.max_new_tokens:
                    break
                # Drop finished rows from the batch only once a quarter of it has finished:
                # each drop copies the whole KV cache, which costs more than a few idle rows.
                if len(active) - len(keep) >= max(1, len(active) // 4):
                    if store is not None:
                        self._keep_rows(store, cache, mask, prefix, fed(active),
                                        [k for k in range(len(active)) if k not in keep])
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask = mask[idx]
                    next_pos = next_pos[idx]
                    chosen = chosen[idx]
                    active = [active[k] for k in keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                logits = self._forward(chosen.view(-1, 1), mask, next_pos, cache, prefix).logits
                next_pos = next_pos + 1
            if store is not None:
                self._keep_rows(store, cache, mask, prefix, fed(active), list(range(len(active))))
        if on_done:
            for row in range(len(seqs)):
                if not done[row]:  # stopped by the token budget
                    on_done(row, out_tokens[row])
        return out_tokens

    def _pick(self, logits, gens, params: SamplingParams):
        """The next token of each row: greedy, or sampled with its own generator.

        Sampling inverts the cumulative distribution with one uniform draw per row, which
        samples exactly from ``p`` and lets each row draw from its own generator. With
        ``top_p < 1`` the nucleus (the most likely tokens whose mass first reaches
        ``top_p``) is found among the ``k`` most likely tokens, ``k`` growing from 256
        until every row's nucleus fits: the same set a full sort gives, without sorting
        the whole vocabulary (that sort and a noise draw per vocabulary entry took 120 ms
        per step at batch 32 on 2 cores; this takes about 10).
        """
        torch = self.torch
        if params.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / params.temperature, dim=-1)
        u = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in gens])
        vocab = probs.shape[-1]
        if params.top_p >= 1.0:
            cum = probs.double().cumsum(-1)
            ids = None
        else:
            k = min(256, vocab)
            while True:
                top, ids = probs.topk(k, dim=-1)
                cum = top.double().cumsum(-1)
                if k == vocab or bool((cum[:, -1] >= params.top_p).all()):
                    break
                k = min(4 * k, vocab)
            # Keep the smallest set reaching top_p: a token stays if the mass before it is <= top_p.
            kept = ((cum - top.double()) <= params.top_p).sum(-1)
            cum = torch.where(torch.arange(k, device=cum.device) < kept.unsqueeze(-1), cum, cum.new_tensor(float("inf")))
        total = cum.gather(-1, (cum.isfinite().sum(-1, keepdim=True) - 1)).squeeze(-1)
        rank = torch.searchsorted(cum, (u.to(cum.device) * total).unsqueeze(-1), right=True).squeeze(-1)
        rank = rank.clamp(max=cum.shape[-1] - 1)
        return rank if ids is None else ids.gather(-1, rank.unsqueeze(-1)).squeeze(-1)

    # -- scoring ------------------------------------------------------------------

    def choice_logprobs(self, conversations, options, progress: Progress | None = None,
                        on_result: OnResult | None = None):
        items = []  # (conversation index, option index, token ids, option token count)
        singles = []  # (conversation index, shared token ids, each option's one token)
        for ci, (conv, opts) in enumerate(zip(conversations, options)):
            if not opts:
                raise ValueError(f"conversation {ci} has no options to score")
            prefix_text = self.render(conv)
            prefix = self.encode(prefix_text)
            fulls = [self.encode(prefix_text + o) for o in opts]
            # Score every option from the same token boundary: the longest start that
            # the prefix and all options' tokenizations share. A tokenizer that merges
            # the prefix's last characters with "(" then still compares like with like.
            k = len(prefix)
            for f in fulls:
                n = 0
                while n < min(k, len(f)) and f[n] == prefix[n]:
                    n += 1
                k = n
            if k == 0:
                raise CaiError("cannot score options: the prompt renders to no tokens")
            for oi, f in enumerate(fulls):
                if len(f) <= k:
                    raise ValueError(f"option {opts[oi]!r} adds no tokens to the prompt")
            if all(len(f) == k + 1 for f in fulls):
                # The usual case ("A" / "B"): every option is one token after the shared
                # part, so one forward pass over the shared part scores them all.
                singles.append((ci, fulls[0][:k], [f[k] for f in fulls]))
            else:
                items += [(ci, oi, f, len(f) - k) for oi, f in enumerate(fulls)]
        scores = [[0.0] * len(o) for o in options]
        self._score_singles(singles, scores, progress, on_result)
        self._score_options(items, scores, progress, on_result)
        return scores

    def _score_batches(self, seqs: list[list[int]]) -> list[list[int]]:
        """Scoring batches: by shared start where the engine keeps a batch's prefix once (the
        CPU, :func:`_prefix_batches`); elsewhere longest first (:func:`_length_batches`; on a GPU more, smaller batches cost launches; not measured there, so not changed)."""
        if self.score_batch_size > 1 and self._shared_prefix_ok():
            return _prefix_batches(seqs, self.score_batch_size)
        return _length_batches(seqs, self.score_batch_size)

    def _score_singles(self, singles, scores, progress, on_result) -> None:
        torch = self.torch
        for rows in self._score_batches([s[1] for s in singles]):
            batch = [singles[i] for i in rows]
            with torch.inference_mode():
                logits = self._prefill([b[1] for b in batch], keep=1)[0]
            logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
            for r, (ci, _, option_ids) in enumerate(batch):
                scores[ci] = [float(logp[r, t]) for t in option_ids]
                finished(ci, scores[ci], progress, on_result)

    def _score_options(self, items, scores, progress, on_result) -> None:
        """Options of several tokens: each option is its own sequence."""
        torch = self.torch
        left: dict[int, int] = {}
        for ci, *_ in items:
            left[ci] = left.get(ci, 0) + 1
        for rows in self._score_batches([it[2] for it in items]):
            batch = [items[i] for i in rows]
            keep = max(b[3] for b in batch) + 1
            with torch.inference_mode():
                logits, _, _, ids, _, _ = self._prefill(
                    [b[2] for b in batch], keep=keep, own=[b[3] + 1 for b in batch]
                )
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, (ci, oi, f, n) in enumerate(batch):
                targets = ids[r, -n:]
                lp = logp[r, keep - n - 1: keep - 1, :].gather(-1, targets.view(-1, 1))
                scores[ci][oi] = float(lp.sum())
                left[ci] -= 1
                if left[ci] == 0:
                    finished(ci, scores[ci], progress, on_result)

    # -- embeddings ---------------------------------------------------------------

    def embed(self, texts, layer: int | None = None, max_tokens: int = 256):
        """One vector per text: a hidden layer's states mean-pooled over the text's tokens
        (the raw text, no chat template, at most ``max_tokens``; the first token is left out
        of texts of two or more, as its state is an attention sink with an outsized norm),
        L2-normalised; a float32 numpy array of shape (len(texts), hidden size).

        ``layer`` indexes ``hidden_states`` (0: the embeddings, -1: the last layer); None
        takes the middle layer, which told paraphrases from unrelated prompts better than
        the last on SmolLM2-135M (docs/expand.md). Nothing is sampled: the same texts give
        the same vectors whatever the batch."""
        import numpy as np

        torch = self.torch
        if layer is None:
            layer = (self.model.config.num_hidden_layers + 1) // 2
        seqs = [self.encode(t)[:max_tokens] or [self.pad_id] for t in texts]
        out = np.zeros((len(seqs), self.model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), self.score_batch_size):
            idx = order[start:start + self.score_batch_size]
            width = max(len(seqs[i]) for i in idx)
            # Right padding: each text keeps positions 0..n-1, and causal attention keeps
            # its tokens from ever seeing the padding after them.
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, : len(seqs[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                    use_cache=False).hidden_states[layer].float()
            pool = mask.clone()
            pool[:, 0] = (mask.sum(1) < 2).long()  # the first token only where it is all there is
            m = pool.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[idx] = pooled.cpu().numpy()
        return out
