"""The checks a config needs before anything runs that look beyond the config itself.

``RunConfig.check`` (in :mod:`cai.config`, which imports nothing of cai's above the ground
floor) checks every field's range and each section's rules. What needs an engine, an
evaluation set, a model or the file system is checked here, above them: the ``engine.serve``
template, the servers' URLs, the standard sets' names, the users' training files (every
row), the run folder. ``cai validate``, ``cai plan`` and ``cai run`` call
:func:`check_config` first; every error is one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cai.config import RunConfig, judge_engine_config
from cai.datafiles import check_data
from cai.errors import CaiError


def check_config(cfg: RunConfig) -> None:
    """The config's own checks, then the ones that need engines and evaluation sets."""
    cfg.check()
    if cfg.report_to:
        from cai.tracking import check_installed

        check_installed(cfg.report_to)  # a tracker's package is missing: said now, not after the first stage
    if cfg.engine.serve != "none":
        from cai.engines.serve import check_template

        check_template(cfg.engine.serve)
    for section in ("evaluate", "rl"):  # the judges served beside the run's engine
        if getattr(cfg, section).judge_endpoints:
            from cai.engines.openai import check_openai_config

            try:
                check_openai_config(judge_engine_config(cfg, section))
            except CaiError as exc:
                raise CaiError(str(exc).replace("engine.endpoints", f"{section}.judge_endpoints")) from None
    if cfg.evaluate.sets:
        from cai.evaluation.sets import parse_spec

        for spec in cfg.evaluate.sets:
            try:
                parse_spec(spec)
            except CaiError as exc:
                raise CaiError(f"config field 'evaluate.sets': {exc}") from None
        names = [parse_spec(spec)[0].name for spec in cfg.evaluate.sets]
        if len(set(names)) < len(names):
            raise CaiError(f"config field 'evaluate.sets': a set is named twice ({', '.join(names)})")
    # the users' own data files (sft.data, preference_model.data, dpo.data, feedback.human_preferences),
    # every row: a bad row is one line now, not when its stage starts
    check_data(cfg)
    if cfg.engine.batch_invariant and (cfg.engine.kind == "openai" or cfg.engine.serve != "none"):
        raise CaiError(
            "config field 'engine.batch_invariant' is for engine.kind=local without engine.serve: a server "
            "batches as it likes (start vLLM with VLLM_BATCH_INVARIANT=1 for the same), so set it to false"
        )
    if cfg.engine.kind == "openai":
        from cai.engines.openai import check_openai_config

        check_openai_config(cfg.engine)
        if "sft" in cfg.stages and not cfg.sft.model:
            raise CaiError(
                "config field 'sft.model' is empty; with engine.kind=openai the engine's model is remote, "
                "so set sft.model to a local checkpoint ('default', a directory or a hub id) to fine-tune"
            )


def check_inputs(cfg: RunConfig, constitution) -> None:
    """What the config asks of its inputs: the principles it names are in the constitution, and
    it has the system prompt ``critique_revision.system_prompt=constitution`` asks for."""
    from cai.conversations import answer_system_prompt

    if "critique_revision" in cfg.stages:
        answer_system_prompt(constitution, cfg.critique_revision.system_prompt)
    ev = cfg.evaluate
    for field, wanted, pool in (("harmlessness_principle", ev.harmlessness_principle, constitution.comparison_principles),
                                ("helpfulness_principle", ev.helpfulness_principle, constitution.helpfulness_principles)):
        if "evaluate" in cfg.stages and wanted is not None and wanted not in {p.id for p in pool}:
            have = ", ".join(p.id for p in pool) or "none"
            raise CaiError(f"config field 'evaluate.{field}': the constitution has no principle '{wanted}' (have: {have})")


def check_device_here(cfg: RunConfig) -> None:
    """A run (not a plan or a pre-flight) needs its device on this machine."""
    import torch

    device = cfg.engine.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CaiError(f"config field 'engine.device={device}': no CUDA device is visible on this machine; run on a "
                       "GPU node, or set engine.device=auto (or cpu)")
    if device.startswith("cuda") and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise CaiError(f"config field 'engine.device={device}': only {torch.cuda.device_count()} CUDA device(s) are "
                       "visible here (CUDA_VISIBLE_DEVICES?)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CaiError("config field 'engine.device=mps': Apple's MPS is not available on this machine; use auto or cpu")


def check_run_dir(run_dir: str) -> None:
    """The run directory must be a folder, or a folder that can be made: its nearest
    existing parent a writable folder, and no name in it too long for the file system."""
    p = Path(run_dir).expanduser()
    parent = next((a for a in (p, *p.absolute().parents) if _exists(a)), Path("/"))
    try:
        longest = os.pathconf(parent if parent.is_dir() else parent.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    for part in p.parts:
        if len(part.encode("utf-8", "surrogateescape")) > longest:
            raise CaiError(f"config field 'run_dir': a folder name in it is {len(part.encode())} bytes long, more "
                           f"than this file system allows ({longest}); choose a shorter run_dir")
    if parent == p and not p.is_dir():
        raise CaiError(f"config field 'run_dir': '{run_dir}' is a file, not a folder; choose another run_dir")
    if not parent.is_dir():
        raise CaiError(f"config field 'run_dir': '{parent}' is a file, so '{run_dir}' cannot be made inside it; "
                       "choose another run_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CaiError(f"config field 'run_dir': '{parent}' is not writable, so '{run_dir}' cannot be "
                       f"{'written' if parent == p else 'made'}; choose another run_dir or fix its permissions")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, a loop of links...
        return False


# -- the pre-flight (`cai validate`): one line per check -------------------------------------------
#
# On a CPU login node, for a GPU config, every check that can be made here is made; what cannot
# (no GPU visible, a server not reachable from here, the hub offline) is a `warn` that says so.
# `--strict` turns warnings into errors. The device checks read `visible_devices()`, which the
# tests replace with fakes: only a GPU machine runs them for real (benchmarks/gpu_check.py).

OK, WARN, ERROR = "ok", "warn", "error"


@dataclass
class Check:
    name: str
    status: str  # ok, warn or error
    message: str
    whole: bool = False  # the message is a whole one-line error of its own (the same `cai run` gives)

    def line(self) -> str:
        return f"{self.status}: {self.name}: {self.message}"

    def error(self) -> str:
        """What the one `error:` line says of this check when it fails."""
        return self.message if self.whole else f"{self.name}: {self.message}"


@dataclass
class Device:
    name: str
    total_bytes: int
    free_bytes: int


def visible_devices() -> list[Device]:
    """The CUDA devices this process sees (none on a CPU machine)."""
    import torch

    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free, total = torch.cuda.mem_get_info(i)
        out.append(Device(torch.cuda.get_device_name(i), int(total), int(free)))
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _wants_cuda(cfg: RunConfig) -> bool:
    return cfg.engine.device.startswith("cuda") or cfg.engine.serve == "vllm"


def check_devices(cfg: RunConfig, devices: list[Device]) -> Check:
    device = cfg.engine.device
    if not _wants_cuda(cfg):
        if device == "auto" and devices:
            return Check("devices", OK, f"engine.device=auto: {len(devices)} CUDA device(s), {devices[0].name}")
        return Check("devices", OK, f"engine.device={device}: runs on this machine's CPU"
                     + (" (no CUDA device visible)" if device == "auto" else ""))
    if not devices:
        return Check("devices", WARN, f"engine.device={device} but no CUDA device is visible here: cannot check from "
                     "this machine (run `cai validate` on a GPU node to check the devices)")
    want = int(device.split(":")[1]) if ":" in device else 0
    if want >= len(devices):
        return Check("devices", ERROR, f"engine.device={device} but only {len(devices)} CUDA device(s) are visible "
                     "(CUDA_VISIBLE_DEVICES?)")
    sizes = ", ".join(f"{d.name} {_gib(d.total_bytes)} ({_gib(d.free_bytes)} free)" for d in devices)
    return Check("devices", OK, f"{len(devices)} CUDA device(s): {sizes}")


def check_memory_fit(cfg: RunConfig, rows: list[dict] | None, devices: list[Device], world: int) -> Check:
    from cai.memory import RUNTIME_BYTES, device_memory

    if rows is None:
        return Check("memory", WARN, "no plan (memory_check=false or the inputs cannot be read here): not checked")
    need = [(r["memory"]["stage_bytes"] + RUNTIME_BYTES, r["stage"]) for r in rows if r.get("memory")]
    unknown = _unsized(rows)
    if unknown:
        return Check("memory", WARN, f"cannot estimate {', '.join(unknown)}: the config of the model it trains is not "
                     "on this machine (cache it, or run `cai validate` where it is)")
    if not need:
        return Check("memory", OK, "no stage holds a model in this process (every model is served)")
    peak, stage = max(need)
    per = f"the largest stage ({stage}) needs ~{_gib(peak)} per process ({world} process{'es' if world > 1 else ''})"
    if _wants_cuda(cfg):
        if not devices:
            return Check("memory", WARN, f"{per}; no GPU visible here to compare with: each GPU needs that much free")
        have = min(d.free_bytes for d in devices)
        return _fit(cfg, rows, "cuda", have, f"{per}; the smallest GPU has {_gib(have)} free")
    what, available = device_memory("cpu")
    if not available:
        return Check("memory", WARN, f"{per}; this machine's available RAM is unknown")
    return _fit(cfg, rows, "cpu", available // max(1, world), f"{per}; {what}")


def _fit(cfg: RunConfig, rows: list[dict], device: str, available: int, fits: str) -> Check:
    """ok with ``fits``, or the run's own one-line refusal (the first stage that does not fit,
    and what to change) as the error."""
    from cai.memory import check_fit

    try:
        check_fit(rows, device, cfg.memory_margin, available)
    except CaiError as exc:
        return Check("memory", ERROR, str(exc), whole=True)
    return Check("memory", OK, fits)


def check_processes(cfg: RunConfig, devices: list[Device], world: int) -> Check:
    if world <= 1:
        return Check("processes", OK, "1 process (under `accelerate launch` every process checks its own share)")
    if _wants_cuda(cfg):
        if not devices:
            return Check("processes", WARN, f"{world} processes; no GPU visible here to count against (one GPU a "
                         "process on the GPU nodes)")
        if world > len(devices):
            return Check("processes", ERROR, f"{world} processes but {len(devices)} CUDA device(s) visible: two "
                         "processes would share a GPU; launch at most one process per GPU")
        return Check("processes", OK, f"{world} processes on {len(devices)} CUDA device(s)")
    import os

    cores = len(os.sched_getaffinity(0))
    status = OK if world <= cores else WARN
    return Check("processes", status, f"{world} CPU processes on {cores} cores")


def check_serving(cfg: RunConfig) -> Check | None:
    """The serving engine ``engine.serve`` names: importable (or its command found), and its version."""
    import importlib.metadata
    import importlib.util
    import shutil

    serve = cfg.engine.serve
    if serve == "none":
        return None
    package = {"vllm": "vllm", "llama-cpp-python": "llama_cpp"}.get(serve)
    here = not _wants_cuda(cfg) or bool(visible_devices())
    if package is not None:
        if importlib.util.find_spec(package) is None:
            hint = "pip install vllm" if serve == "vllm" else 'pip install "llama-cpp-python[server]"'
            return Check("serving", ERROR if here else WARN, f"engine.serve={serve}: the '{package}' package is not "
                         f"importable here ({hint}{' on the GPU nodes' if not here else ''})")
        dist = {"vllm": "vllm", "llama-cpp-python": "llama_cpp_python"}[serve]
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return Check("serving", OK, f"engine.serve={serve}: {package} {version}")
    from cai.engines.serve import _bundled, template_text

    exe = template_text(serve).split()[0]
    if "{" in exe:
        return Check("serving", WARN, f"engine.serve: the command '{exe}' is a placeholder: cannot check it here")
    found = shutil.which(exe) or _bundled(exe)
    if found is None:
        return Check("serving", ERROR if here else WARN, f"engine.serve={serve}: the command '{exe}' is not found "
                     "here (put it on PATH; for llama-server: `cai serve-setup --build-server`)")
    return Check("serving", OK, f"engine.serve={serve}: {found}")


def probe_models(url: str, api_key: str | None, timeout_s: float) -> list[dict]:
    """The entries of ``GET <url>/models`` (one try, no retries); raises OSError or ValueError."""
    import http.client
    import json
    import urllib.parse

    from cai.engines.openai import normalize_url

    parts = urllib.parse.urlsplit(normalize_url(url))
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("GET", parts.path + "/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        resp = conn.getresponse()
        raw = resp.read()
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from None
    finally:
        conn.close()
    if resp.status != 200:
        raise ValueError(f"HTTP {resp.status}")
    data = json.loads(raw).get("data", [])
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def check_endpoints(cfg: RunConfig, longest: int, timeout_s: float = 5.0) -> list[Check]:
    """Each server the config names: it answers ``/v1/models``, serves the configured name,
    and its context length (where it says) holds the longest request the plan expects."""
    import os

    groups = []
    if cfg.engine.kind == "openai" and cfg.engine.serve == "none":
        groups.append(("engine.endpoints", cfg.engine.endpoints, cfg.engine.model))
    for section in ("evaluate", "rl"):
        settings = getattr(cfg, section)
        if settings.judge_endpoints:
            groups.append((f"{section}.judge_endpoints", settings.judge_endpoints, settings.judge))
    key = os.environ.get(cfg.engine.api_key_env) or None
    out = []
    for field, urls, model in groups:
        for url in urls:
            name = f"endpoint {url}"
            try:
                entries = probe_models(url, key, timeout_s)
            except (OSError, ValueError) as exc:
                out.append(Check(name, ERROR, f"no answer at /v1/models ({type(exc).__name__}: {exc}); a run from this "
                                 f"machine would fail there: check {field}, the server and the network"))
                continue
            entry = next((e for e in entries if e.get("id") == model), None)
            if entry is None:
                served = ", ".join(str(e.get("id")) for e in entries) or "nothing"
                out.append(Check(name, ERROR, f"does not serve '{model}' (it serves {served})"))
                continue
            ctx = entry.get("max_model_len") or (entry.get("meta") or {}).get("n_ctx_train")
            if isinstance(ctx, int) and ctx < longest:
                out.append(Check(name, ERROR, f"serves '{model}' with a context of {ctx} tokens, but the longest "
                                 f"request is about {longest} (demonstrations, prompt and answer budgets); raise the "
                                 "server's context length or lower the few_shot / max_new_tokens settings"))
            else:
                out.append(Check(name, OK, f"serves '{model}'" + (f", context {ctx} >= ~{longest} tokens"
                                                                  if isinstance(ctx, int) else
                                                                  " (it does not say its context length)")))
    return out


def check_models(cfg: RunConfig, timeout_s: float = 3.0) -> list[Check]:
    """Every model the config names: a local folder, a cached hub id, or on a reachable hub.
    Offline (or the hub out of reach) a hub id not cached is one `warn`, with no retries."""
    from cai.models import check_model, hub_reachable, is_hub_id, model_settings, offline

    out, unknown = [], []
    for field, name in model_settings(cfg):
        if name == "default":
            continue  # the embedded model: checked with the config (its package)
        path = Path(name).expanduser()
        if path.exists() and not (path / "config.json").is_file() or not path.exists() and not is_hub_id(name):
            try:
                check_model(name, field, cfg.engine.revision)  # its own one-line error
            except CaiError as exc:
                out.append(Check(f"model {field}", ERROR, str(exc), whole=True))
            continue
        if path.exists():
            from cai.models import has_weights

            if not has_weights(path):
                out.append(Check(f"model {field}", WARN, f"'{name}': a config and no weights here (enough to plan, "
                                 "not to run)"))
            else:
                out.append(Check(f"model {field}", OK, f"'{name}': a local checkpoint"))
            continue
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(name, revision=cfg.engine.revision, local_files_only=True)
            out.append(Check(f"model {field}", OK, f"'{name}': in the local Hugging Face cache"))
        except Exception:
            unknown.append((field, name))
    if unknown:
        names = ", ".join(f"{f}={n}" for f, n in unknown)
        if offline() or not hub_reachable(timeout_s):
            why = "HF_HUB_OFFLINE is set" if offline() else "the hub is not reachable from here"
            out.append(Check("models", WARN, f"cannot check {names}: not in the local cache and {why}; the nodes that "
                             "run must have them cached or reach the hub"))
        else:
            for field, name in unknown:
                try:
                    check_model(name, field, cfg.engine.revision)
                    out.append(Check(f"model {field}", OK, f"'{name}': on the hub (downloaded when first used)"))
                except CaiError as exc:
                    out.append(Check(f"model {field}", ERROR, str(exc), whole=True))
    return out


def check_disk(cfg: RunConfig, rows: list[dict] | None) -> Check:
    import shutil

    if rows is None:
        return Check("disk", WARN, "no plan: the space the run needs is not known")
    need = sum(r.get("disk_bytes", 0) for r in rows)
    p = Path(cfg.run_dir).expanduser()
    where = next((a for a in (p, *p.absolute().parents) if _exists(a)), Path("/"))
    free = shutil.disk_usage(where).free
    status = OK if need <= free else ERROR
    unknown = _unsized(rows)
    if unknown and status == OK:
        return Check("disk", WARN, f"the run writes at least ~{_gib(need)}, more for the models of {', '.join(unknown)}, "
                     f"whose size is not known here; {_gib(free)} free at {where}")
    return Check("disk", status, f"the run writes up to ~{_gib(need)} (models, a checkpoint at a time, the request "
                 f"cache); {_gib(free)} free at {where}")


def _unsized(rows: list[dict]) -> list[str]:
    """The training stages whose model's size the plan could not read (its config is not here)."""
    return [r["stage"] for r in rows if not r.get("memory") and (r.get("train_tokens") or r.get("saves"))]


def preflight(cfg: RunConfig, rows: list[dict] | None, world: int, longest: int = 0,
              models: list[Check] | None = None) -> list[Check]:
    """Every pre-flight check of a config that passed :func:`check_config` (``rows``: the
    plan's, None when it could not be made; ``models``: :func:`check_models`' lines when
    already made)."""
    devices = visible_devices()
    checks = [check_devices(cfg, devices), check_memory_fit(cfg, rows, devices, world),
              check_processes(cfg, devices, world)]
    serving = check_serving(cfg)
    if serving is not None:
        checks.append(serving)
    checks += check_endpoints(cfg, longest)
    checks += check_models(cfg) if models is None else models
    checks.append(check_disk(cfg, rows))
    return checks


def longest_request(cfg: RunConfig, constitution, sets: dict) -> int:
    """About the longest request the run sends a model (tokens at four characters each): a
    critique/revision round (demonstrations, prompt, answer, critique, revision) or a
    comparison question (demonstrations, prompt, two answers, a chain of thought: the
    feedback stage's, the evaluation's, the rl stage's judge reward's)."""
    from cai.conversations import comparison_demos, principle_texts, revision_demos

    def count(conv) -> int:
        return sum(len(m["content"]) + 16 for m in conv) // 4

    prompt = max((count(p.messages) for splits in sets.values() for ps in splits.values() for p in ps), default=0)
    cr, fb, ev = cfg.critique_revision, cfg.feedback, cfg.evaluate
    ex = constitution.critique_revision_examples
    demos = count(revision_demos(ex if cr.few_shot < 0 else ex[: cr.few_shot], cr.critique)) if ex else 0
    rounds = demos + prompt + 2 * cr.max_new_tokens + cr.critique_max_new_tokens + 64
    cx = constitution.comparison_examples
    texts = principle_texts(constitution)
    fb_demos = count(comparison_demos(cx if fb.few_shot < 0 else cx[: fb.few_shot], texts, fb.chain_of_thought)) if cx else 0
    question = fb_demos + prompt + 2 * fb.max_new_tokens + (fb.cot_max_new_tokens if fb.chain_of_thought else 0) + 64
    ev_demos = count(comparison_demos(cx if ev.few_shot < 0 else cx[: ev.few_shot], texts, False)) if cx else 0
    judged = ev_demos + prompt + 2 * ev.max_new_tokens + 64
    # rl.reward=judge asks the feedback question about two rollouts
    rewarded = question - 2 * fb.max_new_tokens + 2 * cfg.rl.max_new_tokens if cfg.rl.reward == "judge" else 0
    return max(rounds, question, judged, rewarded)
