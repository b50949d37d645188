"""Generation throughput through the OpenAI engine vs the local engine.

One workload, three setups, in one run on one machine:

* (a) cai's ``LocalEngine`` in this process (float32, batch = all prompts);
* (b) ``OpenAIEngine`` on one llama.cpp server (``python -m llama_cpp.server``) with
  ``--n_threads 2``, i.e. the whole 2-core machine;
* (c) ``OpenAIEngine`` on two llama.cpp servers with ``--n_threads 1`` each, load-balanced
  by the engine (least requests in flight).

The servers load the embedded SmolLM2-135M-Instruct Q4_1 GGUF; the local engine loads the
same weights dequantized to float32. The engine renders prompts client-side
(``engine.tokenizer=default``) and sends them to ``/v1/completions``. Every setup samples
at temperature 0.7 (seeded per request) with ``max_new_tokens`` 64 on red-team prompts
(``builtin:red_team`` train split). Prints a markdown table and writes JSON to
``benchmarks/results/openai.json``.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_openai.py [--prompts 32 --max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from cai.config import EngineConfig
from cai.engines.base import SamplingParams
from cai.engines.local import LocalEngine
from cai.engines.openai import build_openai_engine
from cai.models import embedded_gguf, resolve_model
from cai.prompts import load_prompt_set

from _common import log, starved_warning, timed, usable_cores, write_report

TEMPERATURE = 0.7
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "openai.json"


@dataclass
class Result:
    setup: str
    servers: int
    threads_per_server: int
    prompts: int
    seconds: float
    new_tokens: int
    cpu_cores_used: float  # this process only: the servers' CPU time is not in it

    @property
    def prompts_per_s(self) -> float:
        return self.prompts / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "prompts_per_s": self.prompts_per_s, "new_tokens_per_s": self.tokens_per_s}


def start_server(threads: int, log_dir: Path) -> tuple[subprocess.Popen, str]:
    """One llama.cpp server on a free loopback port, using the GGUF's own chat template."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = (log_dir / f"server-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()), "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", str(threads), "--n_ctx", "4096"],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    url = f"http://127.0.0.1:{port}/v1"
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited ({proc.returncode}); see {out.name}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                json.loads(r.read())
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"llama_cpp.server did not start within 180 s; see {out.name}")


def measure(setup: str, servers: int, threads: int, engine, count, prompts, max_new: int, seed: int) -> Result:
    """Warm up every server with a tiny call, then time one call over all ``prompts``."""
    # Not the workload's prompts (llama.cpp would reuse their cached prefix); in flight
    # together, so least-busy routing reaches every server.
    warm = [[{"role": "user", "content": f"Say hello {i}."}] for i in range(max(1, 2 * servers))]
    engine.generate(warm, SamplingParams(temperature=TEMPERATURE, max_new_tokens=2, seed=seed))
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=max_new, seed=seed)
    outs, seconds, cores = timed(lambda: engine.generate(prompts, params))
    result = Result(setup, servers, threads, len(prompts), seconds, sum(count(o[0]) for o in outs), cores)
    log(f"  {setup:<22}: {result.prompts} prompts in {seconds:7.1f} s, {result.prompts_per_s:6.2f} prompts/s, "
        f"{result.tokens_per_s:7.1f} new tok/s")
    return result


def run_servers(setup: str, count: int, threads: int, concurrency: int, count_fn, prompts, max_new, seed, log_dir):
    procs = []
    try:
        for _ in range(count):
            procs.append(start_server(threads, log_dir))
        cfg = EngineConfig(
            kind="openai", model="smollm2", endpoints=[u for _, u in procs], tokenizer="default",
            max_concurrency=concurrency,
        )
        engine = build_openai_engine(cfg, progress=log)
        return measure(setup, count, threads, engine, count_fn, prompts, max_new, seed)
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()


def markdown_table(results: list[Result], base: Result | None) -> str:
    lines = [
        "| setup | servers x threads | prompts | seconds | prompts/s | new tok/s | ratio vs local (prompts/s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r.prompts_per_s / base.prompts_per_s:.2f}x" if base else "-"
        shape = f"{r.servers} x {r.threads_per_server}" if r.servers else "-"
        lines.append(
            f"| {r.setup} | {shape} | {r.prompts} | {r.seconds:.1f} | {r.prompts_per_s:.2f} | {r.tokens_per_s:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32, help="red-team prompts per setup (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=4, help="engine.max_concurrency for the server setups")
    ap.add_argument("--skip-local", action="store_true", help="only the server setups")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"llama_cpp.server is not importable ({exc}); pip install 'llama-cpp-python[server]'")

    train = [p.messages for p in load_prompt_set("builtin:red_team")["train"]]
    prompts = list(itertools.islice(itertools.cycle(train), args.prompts))
    max_new = args.max_new_tokens
    cores = usable_cores()
    load_before = os.getloadavg()
    wall_start = time.perf_counter()
    model_dir = resolve_model("default")

    results: list[Result] = []
    base = None
    local = LocalEngine(model_dir, batch_size=max(1, len(prompts)))
    count = lambda text: len(local.encode(text))  # noqa: E731 - the same tokenizer for every setup
    if not args.skip_local:
        log("cai LocalEngine (in process):")
        base = measure("local", 0, cores, local, count, prompts, max_new, args.seed)
        results.append(base)
    local.model = None  # free the float32 weights before the servers start

    with tempfile.TemporaryDirectory(prefix="cai-bench-openai-") as tmp:
        log("OpenAIEngine, one llama.cpp server with 2 threads:")
        results.append(run_servers("openai 1 server", 1, 2, args.concurrency, count, prompts, max_new, args.seed, Path(tmp)))
        log("OpenAIEngine, two llama.cpp servers with 1 thread each:")
        results.append(run_servers("openai 2 servers", 2, 1, args.concurrency, count, prompts, max_new, args.seed, Path(tmp)))
    wall = time.perf_counter() - wall_start
    load_after = os.getloadavg()

    one, two = results[-2], results[-1]
    summary = {
        "two_servers_vs_one_prompts": two.prompts_per_s / one.prompts_per_s,
        "one_server_vs_local_prompts": one.prompts_per_s / base.prompts_per_s if base else None,
        "two_servers_vs_local_prompts": two.prompts_per_s / base.prompts_per_s if base else None,
    }
    print(f"\nGeneration through the OpenAI engine, SmolLM2-135M-Instruct, {len(prompts)} red-team prompts, "
          f"temperature {TEMPERATURE}, max_new_tokens {max_new}\n")
    print(markdown_table(results, base))
    print(f"\ntwo servers (1 thread each) / one server (2 threads): {summary['two_servers_vs_one_prompts']:.2f}x prompts/s")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; total wall time {wall:.0f} s")
    if base:
        warning = starved_warning(cores, [("local", base.cpu_cores_used)])
        if warning:
            print(warning)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(
        args.out,
        model={"name": "SmolLM2-135M-Instruct", "checkpoint": model_dir, "gguf": str(embedded_gguf())},
        settings={
            "prompts": len(prompts), "seed": args.seed, "temperature": TEMPERATURE, "max_new_tokens": max_new,
            "prompt_set": "builtin:red_team (train)", "max_concurrency": args.concurrency,
            "server": "python -m llama_cpp.server --n_ctx 4096; --n_threads 2 for one server, 1 each for two",
        },
        load_before=load_before, load_after=load_after, wall=wall, results=results, summary=summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
