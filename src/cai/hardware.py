"""What the hardware computes fast, looked up rather than assumed.

Training in bfloat16 pays only where the hardware has bfloat16 units: NVIDIA GPUs from
Ampere on (compute capability 8.0) and x86 CPUs with AVX512-BF16 or AMX-BF16. On an
AVX2-only CPU a bfloat16 matrix product is emulated and runs about 400x slower than in
float32, so ``dtype=auto`` must look before it picks bfloat16.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: x86 CPU flags (``/proc/cpuinfo``) that mean native bfloat16 matrix products.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(name: str, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The first CPU's ``name`` line in ``cpuinfo`` (Linux); None where there is no such file or line."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The flags of the first CPU in ``cpuinfo`` (Linux); empty where there is no such file."""
    return set((_cpuinfo_field("flags", cpuinfo) or "").split())


def bf16_fast(device) -> bool:
    """Whether ``device`` (a torch device or its name) runs bfloat16 matrix products natively.

    CPU: one of :data:`CPU_BF16_FLAGS` in its flags. CUDA: compute capability 8.0 or more
    (``torch.cuda.is_bf16_supported`` without emulation). Anything else (MPS...): no,
    since nothing here can check it.
    """
    import torch

    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cpu":
        return bool(cpu_flags() & set(CPU_BF16_FLAGS))
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def describe_cpu() -> str:
    """The CPU's bfloat16 flags as one phrase, for messages and benchmark reports."""
    have = sorted(cpu_flags() & set(CPU_BF16_FLAGS))
    return f"CPU flags {', '.join(have)}" if have else f"no {' or '.join(CPU_BF16_FLAGS)} in the CPU flags"


#: CPU flags worth naming in a bug report: the vector units cai's speed depends on.
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
#: Optional packages and what they are for (the extra that installs them).
EXTRAS = (("peft", "LoRA (train)"), ("trl", "the TRL reward-function test (test)"),
          ("datasketch", "expand's deduplication (expand)"), ("vllm", "engine.serve=vllm"),
          ("llama_cpp", "engine.serve=llama-cpp, GGUF export (serve)"), ("sentencepiece", "GGUF export (serve)"),
          ("playwright", "the report's browser tests"), ("pandas", "Parquet and CSV sets (test)"),
          ("psutil", "the sharding tests"), ("huggingface_hub", "hub downloads"))
#: Environment variables whose values go into a bug report (tokens and keys: their names only).
ENV_VARS = ("CAI_CACHE_DIR", "CAI_ALLOW_SLOW_DTYPE", "CAI_TRACEBACK", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT",
            "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def environment() -> list[tuple[str, str]]:
    """What a bug report needs, as (name, value) rows (``cai env``): versions, platform, CPU
    features, whether training picks bfloat16 here, GPUs, optional extras and settings."""
    import importlib.util
    import os
    import platform
    import sys

    rows = [("cai", _version("cai")), ("python", sys.version.split()[0]), ("platform", platform.platform())]
    for dist in ("torch", "transformers", "accelerate", "datasets", "safetensors", "tokenizers", "gguf"):
        rows.append((dist, _version(dist)))
    flags = cpu_flags()
    rows.append(("cpu", f"{_cpuinfo_field('model name') or 'unknown'}; {os.cpu_count()} logical cores"))
    rows.append(("cpu flags", ", ".join(f for f in REPORTED_CPU_FLAGS if f in flags) or "none of "
                 + ", ".join(REPORTED_CPU_FLAGS)))
    rows.append(("bfloat16 on cpu", "native (dtype=auto trains bf16-mixed)" if flags & set(CPU_BF16_FLAGS)
                 else "emulated (dtype=auto trains float32)"))
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                prop = torch.cuda.get_device_properties(i)
                rows.append((f"gpu {i}", f"{prop.name}, {prop.total_memory / 2**30:.1f} GiB, compute capability "
                             f"{prop.major}.{prop.minor}, bf16 {'yes' if bf16_fast(f'cuda:{i}') else 'no'}"))
            rows.append(("cuda", str(torch.version.cuda)))
        else:
            rows.append(("gpu", "none visible to torch" + (f" (torch built for CUDA {torch.version.cuda})"
                                                           if torch.version.cuda else " (a CPU build of torch)")))
    except ImportError:
        rows.append(("gpu", "unknown: torch is not installed"))
    for module, what in EXTRAS:
        found = importlib.util.find_spec(module) is not None
        rows.append((f"extra {module}", f"{_version(module) if found else 'not installed'} ({what})"))
    for var in ENV_VARS:
        if var in os.environ:
            rows.append((var, os.environ[var]))
    secrets = sorted(k for k in os.environ if k in ("HF_TOKEN", "OPENAI_API_KEY") or k.startswith("CAI_API_KEY"))
    if secrets:
        rows.append(("set, values not shown", ", ".join(secrets)))
    return rows


def _version(dist: str) -> str:
    import importlib.metadata

    names = {"llama_cpp": "llama_cpp_python"}
    try:
        return importlib.metadata.version(names.get(dist, dist))
    except importlib.metadata.PackageNotFoundError:
        try:
            return str(getattr(__import__(dist), "__version__", "installed"))
        except Exception:  # noqa: BLE001 - a report line, never a crash
            return "not installed"


def return_free_memory(collect: bool = True) -> None:
    """Collect garbage (unless ``collect`` is false) and hand the C heap's free pages back
    to the OS (glibc's ``malloc_trim``; elsewhere only the collection).

    A released model's tensors are freed, but glibc keeps much of that memory in its heap
    for reuse (its mmap threshold grows with the largest block freed), so the process's
    resident memory stays high and the next model loads on top of it. Measured with the
    embedded model (4 engines loaded and released in turn): resident memory after a
    release 875 MiB without the trim, 418 MiB with it; peak 1,608 against 1,303 MiB.
    """
    import gc

    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim
