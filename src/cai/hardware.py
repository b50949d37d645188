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


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The flags of the first CPU in ``cpuinfo`` (Linux); empty where there is no such file."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


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
