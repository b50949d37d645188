"""Helpers shared by the benchmarks in this folder (imported as ``_common``).

The benchmarks run as scripts (``python benchmarks/bench_*.py``), so this folder is
``sys.path[0]`` and a plain ``import _common`` finds this file.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable, Sequence


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``fn()`` once; return its value, the wall seconds and the CPU cores it kept busy.

    Cores busy is process CPU time / wall time: it drops below the cores torch may use
    when other processes compete for them, which is how the benchmarks flag noise.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    value = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return value, seconds, cpu / seconds


def usable_cores() -> int:
    """The cores torch may use here: the affinity mask capped by torch's thread count."""
    import torch

    return min(len(os.sched_getaffinity(0)), torch.get_num_threads())


def starved_warning(cores: int, busy: Sequence[tuple[str, float]]) -> str | None:
    """A warning line when any timed run kept fewer than 75% of ``cores`` busy.

    ``busy`` holds (label, cores busy) for every timed run.
    """
    starved = [(label, used) for label, used in busy if used < 0.75 * cores]
    if not starved:
        return None
    rows = ", ".join(f"{label} {used:.2f}" for label, used in starved)
    return f"WARNING: other processes competed for the {cores} cores (cores busy: {rows}); these numbers are noisy"


def machine_info() -> dict:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def write_report(out, model: dict, settings: dict, load_before, load_after, wall: float, results, summary: dict) -> None:
    """Write one benchmark's JSON report (same layout for every benchmark)."""
    import json

    report = {
        "model": model,
        "settings": settings,
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": load_after},
        "wall_seconds": wall,
        "results": [r.to_dict() for r in results],
        "summary": summary,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


#: A child process that runs ``cai run`` (argv[1]: JSON ``[preset or null, overrides]``) and
#: prints, as JSON on its last line, its resident memory after the imports and at its peak
#: (``VmHWM``), and its anonymous resident memory (``RssAnon``) after the imports and at its
#: highest, sampled every 20 ms by a thread. ``VmHWM`` also counts the file pages of mapped
#: checkpoints (a safetensors file being loaded), which the OS can drop under pressure;
#: ``RssAnon`` is the memory that must fit.
RSS_CHILD = r"""
import json, sys, threading, time

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

import torch, transformers, accelerate, peft  # noqa: F401,E401
from cai.config import load_config
from cai.pipeline import run_pipeline
import cai.stages
cai.stages.registry()
preset, args = json.loads(sys.argv[1])
base, base_anon = status("VmRSS"), status("RssAnon")
peak_anon = [base_anon]

def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
run_pipeline(load_config(preset, args), log=lambda m: print(m, file=sys.stderr))
peak_anon[0] = max(peak_anon[0], status("RssAnon"))
print(json.dumps({"rss_after_imports": base, "peak_rss": status("VmHWM"), "anon_after_imports": base_anon,
                  "peak_anon": peak_anon[0]}))
"""


def untrained_pm(model: str, folder) -> None:
    """Save ``model`` with a fresh one-output score head (a preference model that was not
    trained) and its tokenizer in ``folder``."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model)
    head = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    head.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    head.save_pretrained(folder)
    tok.save_pretrained(folder)
