"""Runs stages over a run directory, skipping what is finished.

Layout of a run directory::

    RUN_DIR/
      config.yaml          the resolved configuration of the latest `cai run`
      cache.sqlite         every engine request and its answer (resume, reuse)
      tracking.json        the experiment id of the trackers in report_to (cai.tracking)
      tracking/            their local files (TensorBoard's event files, tensorboard/<id>/<stage>)
      <stage>/             one folder per finished stage, with manifest.json
      <stage>.partial/     a stage that is running or was interrupted

Under ``accelerate launch`` every process runs ``cai run``. Only the main process writes
``config.yaml``, manifests and logs, renames ``<stage>.partial`` into place and runs the
data stages (their engines and request cache live there); training stages
(``StageSpec.distributed``) run in every process, each on its share of the batches. All
processes meet at a barrier after each stage, so every one sees the same finished stages.

A stage is finished when ``<stage>/manifest.json`` says so and its fingerprint (a hash
of the config fields the stage reads and of its upstream stages' fingerprints) matches
the current config. A finished stage is skipped; a changed one is rerun, and its
engine requests that did not change come from the cache.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from cai.checks import check_config, check_device_here, check_inputs, check_run_dir
from cai.config import RunConfig, config_hash, results_dict, to_dict
from cai.distributed import MainGate, broadcast_on_main, launch_token, process_state, world_size
from cai.errors import CaiError
from cai.artifacts import CHECKPOINT, PARTIAL_STAMP, hash_outputs, read_manifest, verify_stage
from cai.io import write_json, write_text
from cai.hardware import return_free_memory
from cai.runlock import RunLock
from cai.layout import CONFIG, SERVERS
from cai.stage import Engines, StageContext, StageSpec
from cai.stage_names import STAGES
from cai.tracking import open_tracker
from cai.stages import check_order


def _stages() -> dict[str, StageSpec]:
    from cai.stages import registry

    return registry()


def stage_names() -> list[str]:
    return list(STAGES)


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("cai", "torch", "transformers", "accelerate", "datasets"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except ImportError:
            pass
    return out


def _slice(cfg: RunConfig, keys) -> dict:
    d = to_dict(cfg)
    return {k: d[k] for k in keys}


def fingerprints(cfg: RunConfig) -> dict[str, str]:
    """Each stage's fingerprint: a hash of the config fields it reads that change results
    (speed-only settings such as ``engine.batch_size`` are left out), of its upstream
    stages' fingerprints and of the content of the files it reads from outside the run
    (``sft.data``...: an edited file reruns the stage)."""
    from cai.datafiles import data_fingerprint

    specs = _stages()
    results = results_dict(cfg)
    out: dict[str, str] = {}
    for name, spec in specs.items():
        up = {n: out.get(n) for n in spec.upstream(cfg)}
        what = {"config": {k: results[k] for k in spec.config_keys}, "needs": up, "stage": name}
        data = data_fingerprint(cfg, name)
        if data:  # (left out when none, so the fingerprints of runs on cai's own data stay as they were)
            what["data"] = data
        out[name] = config_hash(what)
    return out


# -- promotion --------------------------------------------------------------------------------


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _promote(partial: Path, final: Path) -> None:
    """Put a finished ``<stage>.partial`` in place of ``<stage>``, with no moment where a crash
    loses both: the old folder is set aside (``<stage>.old``) before the rename and removed
    after it, and :func:`_recover` finishes the job if a crash falls in between."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    _sync_dir(final.parent)
    _drop_run_state(final)
    shutil.rmtree(old, ignore_errors=True)


def _drop_run_state(final: Path) -> None:
    """Remove what only an interrupted run needed from a finished stage folder: the stamp and
    a training stage's checkpoint (neither is an artifact)."""
    (final / PARTIAL_STAMP).unlink(missing_ok=True)
    shutil.rmtree(final / CHECKPOINT, ignore_errors=True)


def _recover(run_dir: Path, name: str, fingerprint: str, log: Callable[[str], None]) -> None:
    """Finish a promotion a crash interrupted (see :func:`_promote`): a ``.partial`` whose
    manifest says complete had finished (the manifest is written last)."""
    final, partial = run_dir / name, run_dir / f"{name}.partial"
    old = final.with_name(final.name + ".old")
    done = read_manifest(run_dir, f"{name}.partial")
    if done and done.get("status") == "complete" and (not final.exists() or done.get("fingerprint") == fingerprint):
        if not final.exists() and old.exists():
            os.replace(old, final)  # set aside just before the crash: _promote replaces it properly
        _promote(partial, final)
        log(f"[{name}] finished the move into place that an interrupted run had begun")
    if old.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)  # the new folder never arrived: keep the previous result
    if final.exists():
        _drop_run_state(final)  # renamed, then the crash: neither the stamp nor a checkpoint is an artifact


def distributed_state(cfg: RunConfig):
    """accelerate's process state when launched in several processes, else None.

    Set up here, before any stage, so that every stage's ``Accelerator`` joins the same
    process group (with ``dist_timeout_s`` as its timeout); on a machine without GPUs (or
    ``engine.device=cpu``) that is gloo on CPU.
    """
    if world_size() <= 1:
        return None
    import torch

    cpu = cfg.engine.device == "cpu" or (cfg.engine.device == "auto" and not torch.cuda.is_available())
    return process_state(cpu, cfg.dist_timeout_s)


def _fresh_partial(partial: Path, fingerprint: str, log: Callable[[str], None]) -> None:
    """Make ``partial`` ready for a stage run with ``fingerprint``.

    What an interrupted run left there (training checkpoints) is resumed only if that run
    had the same configuration and inputs: the folder carries its fingerprint, and one
    with another fingerprint (or none) is cleared. Engine requests are not lost either
    way: they live in the run's request cache, keyed by their content.
    """
    stamp = partial / PARTIAL_STAMP
    if partial.exists():
        if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == fingerprint:
            return
        if any(partial.iterdir()):
            log(f"discarding {partial.name}/: an interrupted run with another configuration left it")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    stamp.write_text(fingerprint + "\n", encoding="utf-8")


def run_pipeline(cfg: RunConfig, log: Callable[[str], None] = print, force: bool = False) -> Path:
    check_config(cfg)
    specs = _stages()
    dist = distributed_state(cfg)
    is_main = dist is None or dist.is_main_process
    if not is_main:
        log = lambda _msg: None  # noqa: E731 - one log, from the main process
    check_run_dir(cfg.run_dir)
    check_order(cfg)
    run_dir = Path(cfg.run_dir)
    lock = RunLock(run_dir)
    token = launch_token(dist) if dist is not None else None  # right after the process group's rendezvous

    # Read-only checks, in every process (each fails the same way on its own, and none waits
    # in a collective while the main process checks):
    from cai.models import check_model_settings
    from cai.plan import check_memory

    check_device_here(cfg)
    check_model_settings(cfg)  # a missing model is found now, not hours later in its stage
    if "prepare" in cfg.stages:
        from cai.inputs import load_inputs

        # bad input files stop the run before it writes anything (and are said once)
        check_inputs(cfg, load_inputs(cfg)[0])
    # a plan that cannot fit is refused now, not when its stage runs out of memory
    check_memory(cfg, world=dist.num_processes if dist is not None else 1, log=log)

    def claim() -> dict:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        from cai.engines.serve import reap_orphans

        # Servers a run on this folder started and could not stop (it was killed with -9):
        # under the lock no other cai uses them; only processes matching their record go.
        reap_orphans(run_dir / SERVERS, log)
        return {}

    gate = tracker = None
    if dist is None:
        claim()
    else:  # every process of one launch is one run: the main process holds the lock for all
        broadcast_on_main(dist, claim)
    try:
        if dist is not None:
            gate = MainGate(dist, run_dir, token)
        if is_main:  # one tracker per run, in the main process: the others' metrics are summed into its
            tracker = open_tracker(cfg.report_to, run_dir, log)
        return _run_stages(cfg, specs, dist, gate, is_main, run_dir, log, force, tracker)
    finally:
        if tracker is not None:  # closed at the end of the run and on an error
            tracker.finish(log)
        if gate is not None:
            gate.close()
        lock.release()


def _run_stages(cfg, specs, dist, gate, is_main, run_dir: Path, log, force: bool, tracker=None) -> Path:
    if is_main:
        write_text(run_dir / CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    prints = fingerprints(cfg)
    engines = Engines()
    total = time.time()
    for name in cfg.stages:
        spec = specs[name]
        if is_main:
            _recover(run_dir, name, prints[name], log)
        if dist is not None:
            dist.wait_for_everyone()
        for need in spec.upstream(cfg):
            if need not in cfg.stages and read_manifest(run_dir, need) is None:
                raise CaiError(f"stage '{name}' needs stage '{need}'; add it to 'stages' or run it first")
        manifest = read_manifest(run_dir, name)
        if not force and manifest and manifest.get("status") == "complete" and manifest.get("fingerprint") == prints[name]:
            log(f"[{name}] already finished ({manifest.get('seconds', 0):.1f}s), skipped")
            continue
        final = run_dir / name
        partial = run_dir / f"{name}.partial"
        if is_main:
            _fresh_partial(partial, prints[name], lambda msg, name=name: log(f"[{name}] {msg}"))
        if dist is not None:
            dist.wait_for_everyone()  # the others use the folder the main process made
        partial.mkdir(parents=True, exist_ok=True)
        for need in spec.upstream(cfg):  # what this stage reads is what its upstream stage wrote
            if read_manifest(run_dir, need) is not None:
                verify_stage(run_dir, need)
        if spec.distributed:
            engines.release()
        ctx = StageContext(cfg=cfg, run_dir=run_dir, out=partial, name=name, log=log, engines=engines, is_main=is_main,
                           tracker=tracker)
        log(f"[{name}] running" + (f" in {dist.num_processes} processes" if dist and spec.distributed else ""))
        started = time.time()
        try:
            if dist is None or spec.distributed:
                counts = spec.run(ctx) or {}
            else:  # the others wait outside the process group's timeout (cai.distributed)
                counts = gate.run(lambda: spec.run(ctx) or {})
        finally:
            engines.release_served()
            return_free_memory()  # a finished training stage's model: its heap back to the OS
        seconds = time.time() - started

        def finish() -> dict:
            # The manifest is written last, after every output is on disk with its hash; the
            # stamp stays until the folder is in place (see _promote / _recover).
            write_json(
                partial / "manifest.json",
                {
                    "stage": name,
                    "status": "complete",
                    "fingerprint": prints[name],
                    "config": _slice(cfg, spec.config_keys),
                    "needs": {n: prints.get(n) for n in spec.upstream(cfg)},
                    "inputs": ctx.inputs,
                    "counts": counts,
                    "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(),
                    "seconds": round(seconds, 3),
                    "versions": versions(),
                    "outputs": hash_outputs(partial),
                },
            )
            _promote(partial, final)
            return {}

        if dist is None:
            finish()
        else:  # hashing a large checkpoint takes minutes: the others wait outside a collective
            gate.run(finish)
        if not is_main:
            continue
        log(f"[{name}] done in {seconds:.1f}s: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    engines.release()
    if engines.used:
        log(f"engine cache: {engines.hits} hits, {engines.misses} new requests")
    log(f"run finished in {time.time() - total:.1f}s: {run_dir}")
    for name in cfg.stages:
        log(f"  {name:<18} {run_dir / name}")
    report = run_dir / "report" / "index.html"
    if "report" in cfg.stages and report.is_file():
        log(f"report: {report.resolve()}  (open it in a browser)")
    return run_dir
