"""One int8 linear layer's forward: the outlier channels summed in a loop against one matmul.

``Int8Linear.forward`` adds its 16 float outlier channels to the int8 product. From c8ee90d
to a6694db they were added one channel at a time (a fixed order, so a row's sum did not
depend on the number of rows); now they are one float matmul added in place. This times
both layers (the loop's read from ``git show a6694db^:src/cai/engines/int8.py``) on the
embedded model's layer shapes, at 32 rows (decoding) and 4,800 rows (a scoring prefill),
best of 3 x 10 calls, and prints the ratio and the largest relative difference.

    python benchmarks/bench_int8_layer.py
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loop_layer():
    src = subprocess.run(["git", "-C", str(ROOT), "show", "a6694db^:src/cai/engines/int8.py"], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="cai-int8-loop-")) / "int8_loop.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("int8_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Int8Linear


def best(f, x, calls: int = 10, rounds: int = 3) -> float:
    f(x)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            f(x)
        times.append((time.perf_counter() - t) / calls * 1e3)
    return min(times)


def main() -> int:
    import torch

    from cai.engines.int8 import Int8Linear

    Loop = loop_layer()
    torch.manual_seed(0)
    print("| layer (in -> out) | rows | loop ms | matmul ms | loop / matmul | max relative difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, n in ((576, 1536), (1536, 576), (576, 576)):
        lin = torch.nn.Linear(k, n, bias=False)
        outliers = torch.arange(16) * 7
        old, new = Loop(lin, outliers), Int8Linear(lin, outliers)
        for m in (32, 4800):
            x = torch.randn(m, k)
            x[:, 7] *= 300  # an outlier channel, as the embedded model's layers have
            with torch.inference_mode():
                a, b = old(x), new(x)
                t_old, t_new = best(old, x), best(new, x)
            diff = float((a - b).abs().max() / a.abs().max())
            print(f"| {k} -> {n} | {m} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
