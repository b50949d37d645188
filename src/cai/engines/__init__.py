"""Engines: one small protocol (``Engine``), a local transformers engine, an
OpenAI-compatible HTTP engine, a cache."""

from cai.engines.base import Batching, Engine, SamplingParams
from cai.engines.cache import CachedEngine, RequestCache

__all__ = ["Batching", "Engine", "SamplingParams", "CachedEngine", "RequestCache", "batching", "build_engine"]


def batching(cfg) -> Batching:
    """How the engine an ``EngineConfig`` builds batches its requests, without building it:
    the local engine's own rule, or a server's (requests in flight, each read whole)."""
    if cfg.kind == "openai" or cfg.serve != "none":
        from cai.engines.openai import OpenAIEngine

        return OpenAIEngine.batching_for(cfg.max_concurrency)
    from cai.engines.local import LocalEngine

    if cfg.batch_invariant:
        return LocalEngine.batching_for(1, 1, shared_prefix_once=False)
    return LocalEngine.batching_for(cfg.batch_size, cfg.score_batch_size)


def build_engine(cfg, cache_path=None, progress=print, server_dir=None) -> Engine:
    """An engine from an ``EngineConfig``, wrapped in the request cache if asked.

    With ``engine.serve`` set, a model cai has as a folder gets managed servers (their logs
    and pid files in ``server_dir``, default ``<cache>/servers``); closing the engine stops them.
    """
    from cai.engines.serve import wants_server

    if wants_server(cfg, cfg.model):
        from cai.engines.serve import build_served_engine, reap_orphans

        if server_dir is None:
            from cai.models import cache_root

            server_dir = cache_root() / "servers"
        reap_orphans(server_dir, progress)
        engine = build_served_engine(cfg, cfg.model, server_dir, progress)
        if cfg.cache and cache_path is not None:
            engine = CachedEngine(engine, RequestCache(cache_path), chunk_size=max(4 * engine.max_concurrency, 64))
        return engine
    if cfg.kind == "openai":
        from cai.engines.openai import build_openai_engine

        engine = build_openai_engine(cfg, progress=progress)
        if cfg.cache and cache_path is not None:
            engine = CachedEngine(engine, RequestCache(cache_path), chunk_size=max(4 * engine.max_concurrency, 64))
        return engine
    from cai.engines.local import LocalEngine
    from cai.models import resolve_model

    path = resolve_model(cfg.model, cfg.revision, progress=progress)
    engine = LocalEngine(
        path,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        score_batch_size=cfg.score_batch_size,
        trust_remote_code=cfg.trust_remote_code,
        quantize=cfg.quantize,
        batch_invariant=cfg.batch_invariant,
    )
    if cfg.cache and cache_path is not None:
        engine = CachedEngine(engine, RequestCache(cache_path), chunk_size=max(4 * cfg.batch_size, 64))
    return engine
