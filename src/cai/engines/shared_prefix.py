"""Attention over a prompt prefix that every row of a batch shares, kept once.

Batched requests built from one template (the constitution's few-shot
demonstrations, the feedback question's preamble) start with the same long run of
tokens. The local engine runs that prefix once. Without this module its KV cache is
then copied for every row, and every attention call of the batch reads B copies of
it: on a 2-core CPU, a 32-row critique batch with a 1,161-token shared prefix spent
more time in that attention than in the rest of the model.

Here the prefix's keys and values stay one tensor per layer, ``[kv_heads, P, d]``, and
each attention call is split in two, the way cascade attention does it:

* every query of every row against the shared prefix, as one matrix product per KV
  head (the prefix is read once, not once per row);
* each row's queries against its own keys (the differing suffix and the tokens
  generated so far), with its padding and causal mask;

and the two partial softmaxes are merged exactly through their log-sum-exps.

The engine turns this on per forward call (``hf_compat.use_attention``), passes the prefix in the
``cai_shared_prefix`` keyword that transformers forwards to attention functions, and
checks once per model that the result matches ordinary attention
(``LocalEngine._shared_prefix_ok``). Models whose attention this does not cover
(sliding windows, soft-capping, ALiBi, models that do not forward the keyword) fail
that check and keep the copied cache.
"""

from __future__ import annotations


import torch

NAME = "cai_shared_prefix"
KWARG = "cai_shared_prefix"
# Score tensors of the prefix part are computed in chunks of at most this many elements.
CHUNK_ELEMENTS = 1 << 25


class Unsupported(RuntimeError):
    """The model asked for an attention feature this module does not implement."""


class SharedPrefix:
    """The shared prefix of one batch: per-layer keys/values and the rows' own mask.

    ``valid`` is the ``[batch, suffix keys]`` mask of each row's own keys (0 on left
    padding); the engine sets it before every forward call. ``calls`` counts the
    attention calls that used the prefix (the self-check needs one per layer).
    """

    def __init__(self, keys: list, values: list, token_ids: tuple = ()):
        self.keys = keys  # per layer [kv_heads, P, d]
        self.values = values
        self.token_ids = token_ids  # the prefix's tokens
        self.valid = None
        self.calls = 0
        self._bias = None

    @classmethod
    def from_cache(cls, cache, token_ids) -> "SharedPrefix":
        """Take the prefix (``token_ids``) from a batch-1 transformers cache that holds only it."""
        from cai.engines.hf_compat import layer_kv

        keys, values = [], []
        for k, v in layer_kv(cache):
            keys.append(k[0].contiguous())
            values.append(v[0].contiguous())
        return cls(keys, values, tuple(token_ids))

    def set_valid(self, valid) -> None:
        self.valid = valid.bool()
        self._bias = None

    def suffix_bias(self, q_len: int, k_len: int, groups: int, device) -> torch.Tensor:
        """Additive mask ``[batch, 1, groups * q_len, k_len]``: padding and causal order.

        The queries are the last ``q_len`` of each row's ``k_len`` own keys, repeated for
        the ``groups`` query heads laid along the query axis. Masked entries get a large
        finite negative rather than -inf, so a padding query with nothing to see stays
        finite (its output is never read). Built once per forward call, not per layer.
        """
        if self._bias is None or tuple(self._bias.shape[-2:]) != (groups * q_len, k_len):
            valid = self.valid.to(device)
            if valid.shape[1] != k_len:
                raise RuntimeError(f"shared-prefix mask covers {valid.shape[1]} keys, attention has {k_len}")
            q_pos = torch.arange(k_len - q_len, k_len, device=device).view(-1, 1)
            causal = torch.arange(k_len, device=device).view(1, -1) <= q_pos  # [q, k]
            seen = causal.unsqueeze(0) & valid.unsqueeze(1)  # [b, q, k]
            bias = torch.zeros(seen.shape, dtype=torch.float32, device=device)
            bias.masked_fill_(~seen, torch.finfo(torch.float32).min / 2)
            self._bias = bias[:, None].repeat(1, 1, groups, 1)
        return self._bias


def _flash_cpu():
    """torch's fused CPU attention kernel that also returns the log-sum-exp, if present."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FLASH_CPU = _flash_cpu()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, bias: torch.Tensor | None):
    """Softmax attention of ``q [n, h, m, d]`` over ``k/v [n, h, s, d]``: output and log-sum-exp.

    ``bias`` is an additive float mask broadcastable to ``[n, h, m, s]``. On the CPU this
    is torch's fused flash kernel (one pass, no score matrix in memory); elsewhere
    plain matrix products, in chunks of queries so the scores stay small.
    """
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        if bias is not None:
            bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], -1, -1)
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scaling)
        return out, lse.float()
    m = q.shape[2]
    step = max(1, CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    outs, lses = [], []
    kt = k.transpose(-1, -2)
    for start in range(0, m, step):
        scores = torch.matmul(q[:, :, start:start + step], kt).float() * scaling
        if bias is not None:
            scores = scores + bias[:, :, start:start + step]
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.matmul(probs.to(v.dtype), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """An attention function for transformers' ``AttentionInterface``.

    ``query [B, H, L, d]``; ``key``/``value`` ``[B, kvh, S, d]`` are each row's own keys
    (the cache holds no prefix). Returns ``([B, L, H, d], None)`` like transformers'
    built-in functions. The ``g = H / kvh`` query heads that share a KV head are laid
    out along the query axis, so grouped-query models need no copies of keys.
    """
    state: SharedPrefix | None = kwargs.get(KWARG)
    if state is None:
        raise Unsupported("the shared-prefix attention was called without its prefix")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise Unsupported("sliding-window, soft-capped or sink attention")
    if dropout:
        raise Unsupported("attention dropout")
    b, h, q_len, d = query.shape
    kvh, s_len = key.shape[1], key.shape[2]
    g = h // kvh
    scaling = d ** -0.5 if scaling is None else scaling
    pk, pv = state.keys[module.layer_idx], state.values[module.layer_idx]
    if pk.shape[0] != kvh or pk.shape[-1] != d:
        raise Unsupported("the prefix cache does not match this layer's heads")

    q_rows = query.reshape(b, kvh, g * q_len, d)  # row b, KV head j: its g heads' queries
    # Every query of every row against the one copy of the prefix.
    q_all = q_rows.transpose(0, 1).reshape(1, kvh, b * g * q_len, d)
    out_p, lse_p = _attend(q_all, pk.unsqueeze(0), pv.unsqueeze(0), scaling, None)
    out_p = out_p.view(kvh, b, g * q_len, d).transpose(0, 1)
    lse_p = lse_p.view(kvh, b, g * q_len).transpose(0, 1)
    # Each row against its own keys, with its padding and causal mask.
    bias = state.suffix_bias(q_len, s_len, g, query.device)  # [B, 1, g*L, S]
    out_s, lse_s = _attend(q_rows, key, value, scaling, bias)

    lse = torch.logaddexp(lse_p, lse_s)
    out = out_p.float() * torch.exp(lse_p - lse).unsqueeze(-1) + out_s.float() * torch.exp(lse_s - lse).unsqueeze(-1)
    state.calls += 1
    return out.to(query.dtype).reshape(b, h, q_len, d).transpose(1, 2).contiguous(), None


def register() -> None:
    from cai.engines.hf_compat import register_attention

    register_attention(NAME, attention)


register()


class Continuations:
    """The KV caches of the rows the engine last generated, kept for requests that extend them.

    A revision request is its critique request plus the critique the model just wrote
    plus the revision instruction; a chain-of-thought judge is scored on its question
    plus the reasoning it just wrote. Each row's own keys and values (everything after
    the shared prefix, its generated tokens included) are kept here after a generate
    call, and the next batch whose rows start with a kept row's tokens runs only what
    comes after them. Reuse is exact: a row is reused only as far as its token ids match
    the new request's, at the same positions behind the same prefix.

    The entries are dropped when the model's weights change (RL updates the policy the
    engine samples from) and replaced by each generate call's rows; at most
    ``budget_bytes`` of keys and values are kept.
    """

    def __init__(self, budget_bytes: int = 1 << 30):
        self.budget = budget_bytes
        self.groups: dict[tuple, tuple] = {}  # prefix token ids -> (SharedPrefix, [(own ids, keys, values)])
        self.weights = None
        self.used = 0

    def clear(self) -> None:
        self.groups, self.weights, self.used = {}, None, 0

    def has_room(self, size: int) -> bool:
        return self.used + size <= self.budget

    def add(self, prefix_ids: tuple, prefix: SharedPrefix, ids: list[int], keys: list, values: list, weights) -> None:
        size = sum(k.numel() * k.element_size() * 2 for k in keys)
        if self.used + size > self.budget:
            return
        if self.weights != weights:
            self.clear()
            self.weights = weights
        self.groups.setdefault(prefix_ids, (prefix, []))[1].append((ids, keys, values))
        self.used += size

    def match(self, seqs: list[list[int]], limits: list[int], weights, min_prefix: int = 0):
        """The kept group whose prefix starts every row, and each row's best kept row.

        ``limits[i]`` is how many of row i's tokens may come from the cache at most; the
        group's prefix must be at least ``min_prefix`` tokens (else running the batch's
        own common prefix is the better deal). Returns ``(prefix_len, prefix, [(kept
        row or None, tokens reused)])`` or ``None``.
        """
        if not self.groups or weights != self.weights:
            self.clear()
            return None
        best = None
        for prefix_ids, (prefix, rows) in self.groups.items():
            n = len(prefix_ids)
            if n >= max(1, min_prefix) and (best is None or n > best[0]) and all(
                lim >= n and tuple(s[:n]) == prefix_ids for s, lim in zip(seqs, limits)
            ):
                best = (n, prefix, rows)
        if best is None:
            return None
        n, prefix, rows = best
        by_first: dict[int, list] = {}
        for row in rows:
            if row[0]:
                by_first.setdefault(row[0][0], []).append(row)
        picks = []
        for s, lim in zip(seqs, limits):
            own, top = s[n:lim], (None, 0)
            for row in by_first.get(own[0], []) if own else []:
                kept = row[0]
                m, stop = 0, min(len(kept), len(own))
                while m < stop and kept[m] == own[m]:
                    m += 1
                if m > top[1]:
                    top = (row, m)
            picks.append(top)
        return n, prefix, picks
