"""GPU check: cai's own pipeline, engine, plan and pre-flight on one GPU, in one bounded run.

A prepared script for the first run of cai on a GPU machine that has no model weights and
no network. Everything it needs is built here:

* **a model**: a random-weight Llama from a config (``--shape 1b``: hidden 2048, 16
  layers, 32 query and 8 key/value heads, MLP 5632, vocabulary 32000, ~0.85B parameters;
  ``--shape tiny``, or ``--tiny``: conftest's 2-layer model, for a CPU) with a byte-level
  BPE tokenizer trained in-process (on the built-in prompt sets plus random words, to the
  model's vocabulary) and a ChatML template, saved with ``save_pretrained`` in the
  scratch folder;
* then, each one a **phase** (its error is recorded and the next phase runs; ``imports``,
  ``build_model`` and ``config`` come first):

  1. ``plan``: ``cai.plan.plan(cfg, calibrate=False)`` for both configs below: each
     stage's counts and peak memory per process;
  2. ``validate``: ``python -m cai validate`` with the same overrides, as a subprocess:
     its output lines and exit code;
  3. ``generate``: a timed batch through ``cai.engines.local.LocalEngine`` (and one row
     alone): new tokens/s;
  4. ``full/<stage>``: prepare, critique_revision, sft, feedback, preference_model, rl and
     dpo through ``cai.pipeline.run_pipeline`` with small caps (few prompts, one round,
     short answers, 2 optimizer steps), training in bf16-mixed on a GPU (float32 on a
     CPU), ``method=full``; one ``run_pipeline`` call per stage, so each stage's peak
     memory is its own;
  5. ``lora/<stage>``: sft, feedback, preference_model, rl and dpo again with
     ``method=lora`` (prepare and critique_revision are copied from the full run: the
     same config, so the pipeline skips them).

  Where sft fails, the stages after it start from the built model instead of the SL-CAI
  model (the row says so in ``note``), so they are still measured.

Per stage it records the seconds and counts of ``RUN_DIR/<stage>/manifest.json``,
tokens/s where a stage gives them, the peak memory (on a GPU
``torch.cuda.max_memory_allocated``, reset before each phase; on a CPU the process's peak
resident memory ``VmHWM``, reset through ``/proc/self/clear_refs``, and its anonymous part
``RssAnon``, sampled every 20 ms) and the plan's figures beside them.

``--budget-s`` (default 420) bounds the whole run: a phase still running when it is spent
is interrupted (status ``timeout``) and the phases after it are ``skipped``. The JSON
(``--out``, default ``benchmarks/results/gpu_check.json``) is rewritten after every phase,
so a run killed from outside keeps what it measured. ``HF_HUB_OFFLINE=1`` is set here:
nothing is downloaded.

    python benchmarks/gpu_check.py                       # on the GPU machine (1b shape)
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json   # the CPU rehearsal
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import time  # noqa: E402

T_START = time.perf_counter()  # the wall time and the budget count from here, imports included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:  # the working tree's cai, installed or not
    sys.path.insert(1, str(SRC))

import _common  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check.json"
#: The stages run, in the pipeline's order (evaluate and report are left out: no new code path on a GPU).
STAGES = ("prepare", "critique_revision", "sft", "feedback", "preference_model", "rl", "dpo")
TRAINING = ("sft", "preference_model", "rl", "dpo")
#: The lora run reuses these finished folders of the full run (their config is the same).
SHARED = ("prepare", "critique_revision")
SHAPES = {
    # ~0.85B parameters (TinyLlama's widths, 16 layers, untied output head)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    # tests/conftest.py's model
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not (loop.last and m['role'] == 'assistant' and continue_final_message is defined "
    "and continue_final_message) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class BudgetSpent(BaseException):
    """Raised in the main thread when ``--budget-s`` runs out during a phase (a
    BaseException, so no ``except Exception`` in the code under test swallows it)."""


# -- the model ----------------------------------------------------------------------------------


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """English from the built-in prompt sets, plus random words so BPE can reach a 32000 vocabulary."""
    texts = []
    try:
        from cai.prompts import load_prompt_set

        for source in ("builtin:red_team", "builtin:helpful", "builtin:benign"):
            for prompts in load_prompt_set(source, 0.25, seed).values():
                texts += [m["content"] for p in prompts for m in p.messages]
    except Exception as exc:  # noqa: BLE001 - random words alone still make a tokenizer
        _common.log(f"tokenizer corpus without the built-in prompts ({type(exc).__name__}: {exc})")
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(40000)]
    return texts + [" ".join(rng.choice(words) for _ in range(50)) for _ in range(4000)]


def build_model(folder: Path, shape: str, device: str, dtype: str) -> dict:
    """Save a random-weight Llama of ``shape`` and its tokenizer (ChatML template) in ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dims = dict(SHAPES[shape])
    t0 = time.perf_counter()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=dims.pop("vocab_size"), show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(tokenizer_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tokenizer_s = time.perf_counter() - t0
    torch.manual_seed(0)
    config = LlamaConfig(**dims, vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    with torch.device(device):  # random init where it is fast (a GPU)
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    save_s = time.perf_counter() - t0
    del model
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"path": str(folder), "shape": shape, "config": {**dims, "vocab_size": len(tok)}, "parameters": params,
            "saved_dtype": dtype, "saved_bytes": size, "tokenizer_seconds": round(tokenizer_s, 2),
            "init_seconds": round(init_s, 2), "save_seconds": round(save_s, 2)}


# -- the configs --------------------------------------------------------------------------------


def overrides(model: Path, run_dir: Path, gpu: bool, method: str) -> list[str]:
    """The config of one run: small caps everywhere, ``method`` in every training stage."""
    new = 32 if gpu else 16  # new tokens per answer
    out = [
        f"run_dir={run_dir}", f"engine.model={model}", f"engine.device={'cuda' if gpu else 'cpu'}",
        f"engine.dtype={'bfloat16' if gpu else 'float32'}", "engine.quantize=none",
        f"engine.batch_size={32 if gpu else 8}", f"engine.score_batch_size={16 if gpu else 8}",
        f"stages=[{', '.join(STAGES)}]",
        "data.max_per_split=8",
        "critique_revision.rounds=1", "critique_revision.max_prompts=4", "critique_revision.few_shot=1",
        f"critique_revision.max_new_tokens={new}", f"critique_revision.critique_max_new_tokens={new // 2}",
        "critique_revision.quality_gates=false",  # random weights write random text: keep every revision
        "feedback.max_prompts=4", "feedback.few_shot=1", f"feedback.max_new_tokens={new}", "feedback.helpful_ratio=0.5",
        "rl.steps=2", "rl.prompts_per_step=2", "rl.samples_per_prompt=2", f"rl.max_new_tokens={new}",
        "rl.eval_prompts=2", "rl.max_prompts=4", "rl.micro_batch_size=8", "rl.frontier_points=1",
        "dpo.frontier_points=1",
    ]
    for stage in ("sft", "preference_model", "dpo"):
        out += [f"{stage}.max_steps=2", f"{stage}.batch_size=4", f"{stage}.max_length=256"]
    for stage in TRAINING:
        out += [f"{stage}.dtype={'bf16-mixed' if gpu else 'float32'}", f"{stage}.method={method}"]
    return out


# -- memory -------------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Memory:
    """Peak memory of one phase: CUDA's allocator on a GPU, else the process's resident memory."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.proc = Path("/proc/self/status").is_file()
        self.what = ("torch.cuda.max_memory_allocated (reset before each phase); baseline = memory_allocated before it"
                     if gpu else
                     "process resident memory: peak VmHWM (reset through /proc/self/clear_refs before each phase) and "
                     "RssAnon sampled every 20 ms; baseline = the value before the phase")
        self._stop = threading.Event()
        self._anon = 0

    def __enter__(self):
        gc.collect()
        if self.gpu:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.base_reserved = torch.cuda.memory_reserved()
        elif self.proc:
            self.hwm_reset = False
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
                self.hwm_reset = True
            self.base, self.base_anon = _status("VmRSS"), _status("RssAnon")
            self._anon = self.base_anon
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._anon = max(self._anon, _status("RssAnon"))

    def __exit__(self, *exc) -> None:
        if self.gpu:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.result = {"measure": "cuda", "baseline_bytes": self.base, "peak_bytes": peak,
                           "added_bytes": peak - self.base, "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
        elif self.proc:
            self._stop.set()
            self._thread.join()
            self._anon = max(self._anon, _status("RssAnon"))
            peak = _status("VmHWM")
            self.result = {"measure": "cpu-rss", "baseline_bytes": self.base, "peak_bytes": peak,
                           "added_bytes": max(0, peak - self.base), "peak_reset": self.hwm_reset,
                           "anon_baseline_bytes": self.base_anon, "anon_peak_bytes": self._anon,
                           "anon_added_bytes": max(0, self._anon - self.base_anon)}
        else:
            import resource

            self.result = {"measure": "ru_maxrss (not reset: process high-water mark since its start)",
                           "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# -- phases ------------------------------------------------------------------------------------


class Check:
    """Runs phases under one time budget and keeps the report, rewriting ``out`` after each."""

    def __init__(self, out: Path, budget_s: float, gpu: bool, report: dict):
        self.out, self.budget_s, self.gpu, self.report = out, budget_s, gpu, report
        self.t0 = T_START
        report["phases"] = {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def phase(self, name: str, fn, skip: str | None = None, note: str | None = None):
        """Run ``fn()`` (a dict of figures) as phase ``name``; returns its figures or None."""
        row: dict = {"status": "skipped", **({"note": note} if note else {})}
        self.report["phases"][name] = row
        left = self.left()
        if skip or left <= 0:
            row["reason"] = skip or f"the budget of {self.budget_s:.0f} s was spent"
            _common.log(f"[{name}] skipped: {row['reason']}")
            self.write()
            return None
        _common.log(f"[{name}] ...")
        start, cpu0, value = time.perf_counter(), time.process_time(), None
        mem = Memory(self.gpu)
        old = signal.signal(signal.SIGALRM, _alarm)
        try:
            with mem:
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
                try:
                    value = fn()
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            row.update(status="ok", **(value or {}))
        except BudgetSpent:
            row.update(status="timeout", error=f"interrupted: the budget of {self.budget_s:.0f} s ran out")
        except PhaseFailed as exc:
            row.update(status="error", error=str(exc)[:2000], **exc.figures)
        except Exception as exc:  # noqa: BLE001 - one phase's failure is data, and the next phase runs
            row.update(status="error", error=f"{type(exc).__name__}: {exc}".strip()[:2000],
                       traceback=traceback.format_exc()[-4000:])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        wall = time.perf_counter() - start
        row.update(wall_seconds=round(wall, 3), cores_busy=round((time.process_time() - cpu0) / max(wall, 1e-6), 2),
                   memory=getattr(mem, "result", None))
        _common.log(f"[{name}] {row['status']} in {wall:.1f}s" + (f": {row['error']}" if "error" in row else ""))
        self.write()
        return value if row["status"] == "ok" else None

    def write(self) -> None:
        self.report["wall_seconds"] = round(time.perf_counter() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)


def _alarm(_signum, _frame):
    raise BudgetSpent()


def plan_phase(configs: dict) -> dict:
    from cai.memory import RUNTIME_BYTES
    from cai.plan import plan

    out = {}
    for method, cfg in configs.items():
        result = plan(cfg, calibrate=False, log=_common.log)
        out[method] = {"device_memory": result["device_memory"], "available_bytes": result["available_bytes"],
                       "world": result["world"], "runtime_bytes": RUNTIME_BYTES, "rows": result["rows"]}
    return {"plans": out}


def validate_phase(args: list[str], env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "cai", "validate", *args]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired as exc:
        text = lambda b: (b.decode(errors="replace") if isinstance(b, bytes) else b or "")  # noqa: E731
        raise PhaseFailed(f"cai validate did not finish in {timeout:.0f} s",
                          {"exit_code": None, "lines": text(exc.stdout).splitlines(),
                           "stderr_lines": text(exc.stderr).splitlines()[-60:]}) from None
    lines = done.stdout.splitlines()
    kinds: dict[str, int] = {}
    for line in lines:
        kind = line.split(":", 1)[0].strip().lower() if ":" in line else "other"
        kinds[kind] = kinds.get(kind, 0) + 1
    figures = {"command": ["python", "-m", "cai", "validate", *args], "exit_code": done.returncode,
               "lines": lines, "stderr_lines": done.stderr.splitlines()[-60:], "line_kinds": kinds,
               "seconds": round(time.perf_counter() - t0, 2)}
    if done.returncode != 0:
        raise PhaseFailed(f"cai validate exited {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}",
                          figures)
    return figures


class PhaseFailed(Exception):
    """A phase that measured something and still failed: its figures are kept."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


def generate_phase(model: Path, gpu: bool, batch: int, new_tokens: int) -> dict:
    import torch

    from cai.engines.base import SamplingParams
    from cai.engines.local import LocalEngine
    from cai.prompts import load_prompt_set

    device = "cuda" if gpu else "cpu"
    t0 = time.perf_counter()
    engine = LocalEngine(str(model), device=device, dtype="bfloat16" if gpu else "float32", batch_size=batch)
    load_s = time.perf_counter() - t0
    prompts = [p.messages for p in load_prompt_set("builtin:helpful", 0.25, 0)["train"]]
    prompts = (prompts * (batch // max(1, len(prompts)) + 1))[:batch]

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def run(convs: list, seed: int) -> dict:
        sp = SamplingParams(n=1, temperature=0.7, top_p=0.95, max_new_tokens=new_tokens, seed=seed)
        sync()
        t = time.perf_counter()
        ids = engine.generate_ids(convs, sp)
        sync()
        took = time.perf_counter() - t
        new = sum(len(row[0]) for row in ids)
        return {"rows": len(convs), "prompt_tokens": sum(engine.count_tokens(c) for c in convs), "new_tokens": new,
                "seconds": round(took, 3), "new_tokens_per_s": round(new / max(took, 1e-9), 1)}

    run(prompts[:2], seed=99)  # warm-up: kernels, allocator
    rows = {"batch": run(prompts, seed=1), "one_row": run(prompts[:1], seed=2)}
    del engine
    return {"engine": "cai.engines.local.LocalEngine", "device": device, "dtype": "bfloat16" if gpu else "float32",
            "batch_size": batch, "max_new_tokens": new_tokens, "load_seconds": round(load_s, 2), **rows,
            "new_tokens_per_s": rows["batch"]["new_tokens_per_s"]}


def stage_phase(cfg, stage: str) -> dict:
    """Run one stage through the pipeline (its upstream stages finished before) and read its manifest."""
    import dataclasses

    from cai.artifacts import read_manifest
    from cai.pipeline import run_pipeline

    one = dataclasses.replace(cfg, stages=[stage])
    run_pipeline(one, log=_common.log)
    manifest = read_manifest(Path(cfg.run_dir), stage)
    if not manifest or manifest.get("status") != "complete":
        raise RuntimeError(f"{stage}: no complete manifest after the run")
    counts = manifest.get("counts", {})
    figures = {"stage_seconds": manifest.get("seconds"), "counts": counts, "tokens_per_s": stage_rates(cfg, stage, counts)}
    return figures


def stage_rates(cfg, stage: str, counts: dict) -> dict:
    """Tokens/s a stage's manifest gives (sft), or that rl's metrics give over the manifest's train seconds."""
    from cai.layout import RunFolder

    rates = {}
    seconds = counts.get("train_seconds") or None  # rounded to 0.1 s: 0.0 on a tiny run
    if counts.get("train_tokens_per_s") is not None:
        rates["train_tokens_per_s"] = counts["train_tokens_per_s"]
    if stage == "rl":
        path = RunFolder(cfg.run_dir).path("rl", "metrics")
        if path.is_file():
            history = json.loads(path.read_text()).get("history", [])
            per_step = cfg.rl.prompts_per_step * cfg.rl.samples_per_prompt
            tokens = round(sum(h.get("length", 0) * per_step for h in history))
            rates["rollout_tokens"] = tokens  # the sampled answers' tokens, over every step
            rates["rollout_tokens_per_train_s"] = round(tokens / seconds, 1) if seconds else None
    if counts.get("steps") and seconds:
        rates["steps_per_train_s"] = round(counts["steps"] / seconds, 3)
    return rates


def missing_upstream(cfg, stage: str) -> str | None:
    """Why ``stage`` cannot run (an upstream stage did not finish), or None."""
    try:
        from cai.artifacts import read_manifest
        from cai.stages import registry

        missing = [n for n in registry()[stage].upstream(cfg) if read_manifest(Path(cfg.run_dir), n) is None]
    except Exception:  # noqa: BLE001 - the phase itself then fails and says why
        return None
    return f"needs {', '.join(missing)}, which did not finish" if missing else None


def without_sft(cfg, model: Path):
    """``cfg`` with every stage that would start from the SL-CAI model starting from ``model``
    instead: when sft fails, the stages after it are still measured."""
    import dataclasses

    from cai.stage_names import SL_CAI

    def swap(section, **fields):
        return dataclasses.replace(section, **{k: str(model) for k, v in fields.items() if v == SL_CAI})

    return dataclasses.replace(cfg, feedback=swap(cfg.feedback, policy=cfg.feedback.policy),
                               preference_model=swap(cfg.preference_model, model=cfg.preference_model.model),
                               rl=swap(cfg.rl, policy=cfg.rl.policy), dpo=swap(cfg.dpo, policy=cfg.dpo.policy))


def finished(run: Path, stage: str) -> bool:
    from cai.layout import RunFolder

    return RunFolder(run).finished(stage)


def reuse_finished(first: Path, run: Path) -> None:
    """Copy the shared data stages the first run finished into ``run`` (the pipeline checks
    their fingerprints and hashes, and skips them)."""
    from cai.layout import RunFolder

    done = RunFolder(first)
    for stage in SHARED:
        if done.finished(stage) and not (run / stage).exists():
            run.mkdir(parents=True, exist_ok=True)
            shutil.copytree(done.manifest_path(stage).parent, run / stage)


# -- the report ---------------------------------------------------------------------------------


def device_info(gpu: bool) -> dict:
    import torch

    try:
        from cai.hardware import bf16_fast, describe_cpu
    except Exception:  # noqa: BLE001 - the imports phase reports it
        bf16_fast, describe_cpu = (lambda _d: None), (lambda: "cpu")
    if gpu:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "total_memory_bytes": props.total_memory,
                "free_memory_bytes_at_start": free, "capability": f"{props.major}.{props.minor}",
                "count": torch.cuda.device_count(), "bf16_fast": bf16_fast("cuda"),
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    import platform

    return {"kind": "cpu", "name": f"CPU {platform.processor() or platform.machine()} ({describe_cpu()})",
            "bf16_fast": bf16_fast("cpu"), "cores": _common.usable_cores()}


#: What cai imports on the way (a missing one is the first thing to know on a new machine).
MODULES = ("torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors", "numpy", "yaml", "matplotlib",
           "datasets", "pyarrow", "tqdm", "cai")


def versions() -> dict:
    import importlib
    import platform

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in MODULES:
        try:
            out[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - a module that does not import is a finding
            out[mod] = f"not importable: {type(exc).__name__}: {exc}"[:300]
    return out


def imports_phase(found: dict) -> dict:
    missing = {m: v for m, v in found.items() if isinstance(v, str) and v.startswith("not importable")}
    if missing:
        raise PhaseFailed(f"modules that do not import: {', '.join(missing)}", {"missing": missing})
    return {"modules": {m: found[m] for m in MODULES}}


def comparison(report: dict) -> list[dict]:
    """Per run and stage: the plan's estimate beside what was measured."""
    table = []
    plans = (report["phases"].get("plan") or {}).get("plans") or {}
    for name, row in report["phases"].items():
        if "/" not in name:
            continue
        method, stage = name.split("/", 1)
        planned = next((r for r in (plans.get(method) or {}).get("rows", []) if r["stage"] == stage), None)
        pmem = (planned or {}).get("memory") or {}
        mem = row.get("memory") or {}
        measured = mem.get("anon_added_bytes", mem.get("added_bytes"))
        counts = row.get("counts") or {}
        table.append({
            "run": method, "stage": stage, "status": row["status"], "stage_seconds": row.get("stage_seconds"),
            "wall_seconds": row.get("wall_seconds"),
            "plan_memory_bytes": pmem.get("stage_bytes"), "measured_memory_bytes": measured,
            "measured_memory_kind": ("RssAnon above the phase's start" if "anon_added_bytes" in mem
                                     else f"{mem.get('measure')} above the phase's start" if mem else None),
            "memory_ratio": round(pmem["stage_bytes"] / measured, 2) if pmem.get("stage_bytes") and measured else None,
            "plan_memory_parts": pmem.get("parts"), "plan_steps": (planned or {}).get("steps"),
            "steps": counts.get("steps"), "plan_train_tokens": (planned or {}).get("train_tokens"),
            "plan_generate": (planned or {}).get("generate"), "plan_new_tokens": (planned or {}).get("new_tokens"),
            "tokens_per_s": row.get("tokens_per_s"),
        })
    return table


def summary(report: dict) -> str:
    def mib(n) -> str:
        return "-" if n is None else f"{n / 2**20:,.0f}"

    dev = report["device"]
    peak = "CUDA max_memory_allocated" if dev["kind"] == "cuda" else "process RssAnon (CPU)"
    lines = [f"GPU check on {dev['name']}: {report['shape']} shape, training {report['settings']['training_dtype']}, "
             f"wall {report['wall_seconds']:.0f}s of a {report['settings']['budget_s']:.0f}s budget; "
             f"peak MiB = {peak} above the phase's start"]
    for name in ("imports", "build_model", "config", "plan", "validate", "generate"):
        row = report["phases"].get(name, {})
        extra = ""
        if name == "validate" and "exit_code" in row:
            extra = f"exit {row['exit_code']}, lines: {row.get('line_kinds')}"
        if name == "generate" and row.get("status") == "ok":
            extra = (f"{row['batch']['new_tokens_per_s']:.0f} new tok/s at batch {row['batch']['rows']}, "
                     f"{row['one_row']['new_tokens_per_s']:.0f} at batch 1")
        if name == "build_model" and row.get("status") == "ok":
            extra = f"{row['parameters']:,} parameters"
        lines.append(f"  {name:<12} {row.get('status', '?'):<8} {row.get('wall_seconds', 0):>7.1f}s  "
                     f"{row.get('error', extra)}"[:240])
    lines.append(f"  {'stage':<24}{'status':<9}{'manifest s':>11}{'plan MiB':>10}{'peak MiB':>10}{'plan/peak':>10}  tok/s")
    for r in report.get("comparison", []):
        rates = r.get("tokens_per_s") or {}
        rate = rates.get("train_tokens_per_s") or rates.get("rollout_tokens_per_train_s")
        lines.append(f"  {r['run'] + '/' + r['stage']:<24}{r['status']:<9}"
                     f"{'-' if r['stage_seconds'] is None else format(r['stage_seconds'], '.1f'):>11}"
                     f"{mib(r['plan_memory_bytes']):>10}{mib(r['measured_memory_bytes']):>10}"
                     f"{'-' if r['memory_ratio'] is None else format(r['memory_ratio'], '.2f'):>10}  "
                     f"{'-' if rate is None else rate}")
    bad = [f"{n} ({r['status']})" for n, r in report["phases"].items() if r["status"] != "ok"]
    lines.append("all phases ok" if not bad else "not ok: " + ", ".join(bad))
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("auto", *SHAPES), default="auto",
                    help="model shape (auto: 1b on a GPU, tiny on a CPU)")
    ap.add_argument("--tiny", action="store_true", help="same as --shape tiny")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds for the whole run; phases not finished by then are interrupted or skipped")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--scratch", type=Path, help="folder for the model and the runs, kept at the end (default: a new "
                    "temp folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder and every run in it")
    ap.add_argument("--methods", default="full,lora", help="training methods to run, in order (default full,lora)")
    ap.add_argument("--gen-batch", type=int, default=None, help="rows of the timed generate batch (32 on a GPU, 8 on a CPU)")
    ap.add_argument("--gen-tokens", type=int, default=None, help="new tokens per row (128 on a GPU, 16 on a CPU)")
    opts = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available() if opts.device == "auto" else opts.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    shape = "tiny" if opts.tiny else opts.shape
    shape = ("1b" if gpu else "tiny") if shape == "auto" else shape
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    if not methods or any(m not in ("full", "lora") for m in methods):
        raise SystemExit(f"--methods: a list of full and lora; got {opts.methods!r}")
    if shape == "tiny" and not gpu and "OMP_NUM_THREADS" not in os.environ:
        # The tiny model's tensors keep one thread busy at most; a second one only waits on it, and on a
        # machine shared with other work that waiting made the rehearsal 3-4x slower (38 s against 141 s).
        os.environ["OMP_NUM_THREADS"] = "1"  # the validate subprocess too
        torch.set_num_threads(1)
    gen_batch = opts.gen_batch or (32 if gpu else 8)
    gen_tokens = opts.gen_tokens or (128 if gpu else 16)

    keep = opts.keep or opts.scratch is not None
    scratch = opts.scratch or Path(tempfile.mkdtemp(prefix="cai-gpu-check-"))
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["CAI_CACHE_DIR"] = str(scratch / "cai-cache")  # nothing read from, or left in, the user's cache
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    model_dir = scratch / "model"
    runs = {m: scratch / f"run-{m}" for m in methods}
    args = {m: overrides(model_dir, runs[m], gpu, m) for m in methods}

    found = versions()
    report = {
        "what": "cai on one device: model build, plan, validate, local-engine generation, and the training stages "
                "through cai's pipeline (full and LoRA), with each stage's manifest seconds, tokens/s and peak "
                "memory beside the plan's estimate",
        "shape": shape, "device": device_info(gpu), "versions": found,
        "memory_measure": Memory(gpu).what,
        "settings": {"budget_s": opts.budget_s, "methods": methods, "stages": list(STAGES),
                     "training_dtype": "bf16-mixed" if gpu else "float32", "gen_batch": gen_batch,
                     "gen_tokens": gen_tokens, "torch_threads": torch.get_num_threads(), "scratch": str(scratch),
                     "overrides": args},
        "machine": {**_common.machine_info(), "loadavg_before": os.getloadavg()},
    }
    check = Check(opts.out, opts.budget_s, gpu, report)
    _common.log(f"GPU check: {report['device']['name']}, shape {shape}, budget {opts.budget_s:.0f}s, scratch {scratch}")
    try:
        check.phase("imports", lambda: imports_phase(found))
        built = check.phase("build_model", lambda: build_model(model_dir, shape, "cuda" if gpu else "cpu",
                                                                 "bfloat16" if gpu else "float32"))
        no_model = None if built else "the model was not built"
        configs: dict = {}

        def load_configs() -> dict:
            from cai.config import load_config

            configs.update({m: load_config(None, args[m]) for m in methods})
            return {"methods": list(configs)}

        check.phase("config", load_configs)
        no_config = no_model or (None if configs else "the config did not load")
        check.phase("plan", lambda: plan_phase(configs), skip=no_config)
        check.phase("validate", lambda: validate_phase(args[methods[0]], env, max(1.0, min(check.left(), 300.0))),
                    skip=no_model)
        check.phase("generate", lambda: generate_phase(model_dir, gpu, gen_batch, gen_tokens), skip=no_model)

        for i, m in enumerate(methods):
            if i > 0:  # the data stages the first run finished: same config, nothing new to measure
                reuse_finished(runs[methods[0]], runs[m])
                if not keep:  # the earlier run's models are not needed any more (disk)
                    shutil.rmtree(runs[methods[i - 1]], ignore_errors=True)
            cfg, note = configs.get(m), None
            for stage in STAGES:
                if i > 0 and stage in SHARED and finished(runs[m], stage):
                    continue
                if cfg is not None and note is None and stage != "sft" \
                        and report["phases"].get(f"{m}/sft", {}).get("status") in ("error", "timeout"):
                    cfg, note = without_sft(cfg, model_dir), "sft failed: this stage starts from the built model"
                check.phase(f"{m}/{stage}", lambda cfg=cfg, stage=stage: stage_phase(cfg, stage),
                            skip=no_config or missing_upstream(cfg, stage), note=note)
    finally:
        report["comparison"] = comparison(report)
        report["machine"]["loadavg_after"] = os.getloadavg()
        if not gpu and shape != "tiny":  # the tiny model's tensors keep about one core busy whatever the load
            busy = [(n, r["cores_busy"]) for n, r in report["phases"].items() if r.get("cores_busy") is not None
                    and r.get("wall_seconds", 0) > 1]
            warning = _common.starved_warning(_common.usable_cores(), busy)
            if warning:
                report["warning"] = warning
        report["all_ok"] = all(r["status"] == "ok" for r in report["phases"].values())
        check.write()
        print(summary(report))
        print(f"wrote {opts.out}")
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
