"""Every place the local engine reaches into transformers internals, behind one adapter.

The engine's speed features lean on parts of transformers that are not a stable public
API: a custom attention function (``AttentionInterface``), switching a model's
``config._attn_implementation`` for one call, the per-layer KV cache classes
(``DynamicCache``, ``DynamicLayer`` and their ``keys``/``values``/``layers``
attributes), and the name of the forward keyword that takes the cache. They are all
used through the functions below and nowhere else, and :func:`check` verifies each of
them once, so a transformers release that changes one fails with a line that says
which piece moved and which versions cai was tested with, not with an AttributeError
deep inside a decode loop.
"""

from __future__ import annotations

import contextlib
import inspect

from cai.errors import CaiError

#: The transformers releases this adapter was written and tested against.
TESTED = ">=4.56,<6 (tested with 5.x)"

#: What :func:`check` verifies, by name: (module, attribute path).
_NEEDED = (
    ("transformers", "AttentionInterface.register"),
    ("transformers", "DynamicCache"),
    ("transformers.cache_utils", "DynamicLayer.lazy_initialization"),
    ("transformers.cache_utils", "DynamicLayer.update"),
    ("transformers.cache_utils", "DynamicLayer.get_seq_length"),
    ("transformers.cache_utils", "DynamicLayer.batch_repeat_interleave"),
    ("transformers.cache_utils", "DynamicLayer.batch_select_indices"),
    ("transformers.cache_utils", "DynamicLayer.crop"),
    ("transformers.cache_utils", "DynamicLayer.reset"),
)

_checked = False


def _version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover - a dependency of cai
        return "not installed"


def _broken(what: str) -> CaiError:
    return CaiError(
        f"transformers {_version()} changed {what}, which cai's local engine relies on; install a release "
        f"cai supports (transformers{TESTED}) or use engine.kind=openai"
    )


def check() -> None:
    """Verify once that every internal this adapter uses is where it expects it."""
    global _checked
    if _checked:
        return
    import importlib

    for module, path in _NEEDED:
        obj = importlib.import_module(module)
        for part in path.split("."):
            if not hasattr(obj, part):
                raise _broken(f"{module}.{path}")
            obj = getattr(obj, part)
    cache = growing_cache()
    if not hasattr(cache, "layers") or not hasattr(cache, "layer_class_to_replicate"):
        raise _broken("DynamicCache.layers / layer_class_to_replicate")
    _checked = True


# -- attention ------------------------------------------------------------------------------


def register_attention(name: str, fn) -> None:
    """Make ``fn`` selectable as attention implementation ``name`` (see :func:`use_attention`)."""
    from transformers import AttentionInterface

    if not hasattr(AttentionInterface, "register"):
        raise _broken("AttentionInterface.register")
    AttentionInterface.register(name, fn)


@contextlib.contextmanager
def use_attention(model, name: str):
    """Route ``model``'s attention through the registered function ``name`` for the calls inside."""
    config = model.config
    if not hasattr(config, "_attn_implementation"):
        raise _broken("PretrainedConfig._attn_implementation")
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def cache_keyword(model) -> str:
    """The forward keyword that takes the KV cache: ``cache`` (newer releases) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return "past_key_values"
    raise _broken("the model's forward() keyword for the KV cache")


# -- the KV cache ---------------------------------------------------------------------------


def layer_kv(cache) -> list[tuple]:
    """Each layer's ``(keys, values)``, ``[batch, kv_heads, tokens, head_dim]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def growing_cache():
    """A KV cache that writes each new token into spare room instead of re-concatenating.

    transformers' ``DynamicLayer`` appends with ``torch.cat``, which copies the whole
    cache of every layer at every decoding step. Here each layer keeps a buffer with room
    for 256 more tokens past the prompt (it grows by doubling if a longer answer needs
    it) and hands attention a view of the filled part. Measured on a quiet 2-core CPU:
    48 new tokens for 16 critique requests with 1,227-token prompts, 28.8 s -> 27.6 s
    (4%); outputs are identical.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._n = 0

        def _views(self) -> None:
            self.keys = self._k[..., : self._n, :]
            self.values = self._v[..., : self._n, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self._k is None or self._n + n > self._k.shape[-2]:
                cap = max(self._n + n + 256, 2 * self._n)
                k = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
                if self._n:
                    k[..., : self._n, :] = self._k[..., : self._n, :]
                    v[..., : self._n, :] = self._v[..., : self._n, :]
                self._k, self._v = k, v
            self._k[..., self._n: self._n + n, :] = key_states
            self._v[..., self._n: self._n + n, :] = value_states
            self._n += n
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n if self.is_initialized else 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.get_seq_length():
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices) -> None:
            if self.get_seq_length():
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            if tokens_to_remove and self.is_initialized:
                self._n = max(0, self._n + tokens_to_remove)
                self._views()

        def reset(self) -> None:
            self._k = self._v = None
            self._n = 0
            super().reset()

    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache
