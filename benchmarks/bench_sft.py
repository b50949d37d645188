"""SL-CAI SFT training throughput of the embedded default model (SmolLM2-135M-Instruct).

Compares, in one run on one machine, two ways to train on the same batches:

* ``plain``: a minimal PyTorch loop, no accelerate: ``model(input_ids,
  attention_mask).logits``, the stage's masked token loss (``cai.training.token_loss``),
  ``loss.backward()``, ``clip_grad_norm_(max_grad_norm)``, ``torch.optim.AdamW`` step
  (the stage's learning rate and weight decay), ``zero_grad``.
* ``cai``: the real stage, ``cai.stages.sft.run``, on a prepared run directory whose
  ``critique_revision/sft/{train,test}.jsonl`` hold the benchmark conversations.

The conversations are the built-in helpful prompts, each with one fixed ~100-word
assistant answer. Both modes tokenize them with ``cai.training.encode_chat`` (the
stage via its own ``load_examples``; the benchmark checks they agree) and train on the
batches of ``cai.training.batches_for_epochs(n, B, 1, seed)``, the stage's batch order,
with N = B * (1 + S) examples: one warm-up step plus S timed steps. Both start from the
same checkpoint in float32 on the CPU, so their per-step losses must agree; the
benchmark reports the largest difference as the check that they did the same work.

Timing, tokens = non-padding tokens (the attention mask's sum, as the stage counts):

* ``plain`` and ``cai``: steps 2..S+1, the first (warm-up) step excluded. The stage's
  loop is timed from its progress callback, which it calls after every optimizer step.
* ``plain, incl. warm-up`` and ``cai, stage-reported``: steps 1..S+1. The second is the
  ``train_tokens_per_s`` that ``sft.run`` returns (its own clock around the training
  loop: no model loading, evaluation or saving, but the warm-up step).
* ``cai, whole run()``: the whole ``sft.run`` call: model loading, tokenization,
  held-out loss before and after, training, saving the model and plotting.

Before either mode, one untimed plain step on a separate model copy warms up the
process (allocator, kernel selection), so neither mode pays those one-time costs.
Then the plain loop runs (``--order cai-first`` swaps the modes), then the stage,
which loads its own fresh copy of the model.
Prints a markdown table and writes JSON to ``benchmarks/results/sft.json``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_sft.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cai.config import RunConfig, load_config
from cai.models import load_model_and_tokenizer
from cai.io import write_json, write_jsonl
from cai.models import resolve_model
from cai.stage import StageContext
from cai.prompts import load_prompt_set
from cai.stages import sft as stage
from cai.training import batches_for_epochs, encode_chat, pad_batch, token_loss

from _common import log, starved_warning, timed, usable_cores, write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sft.json"
PROMPT_SET = "builtin:helpful"
# (batch size, timed optimizer steps); one warm-up step comes on top in both modes.
FULL = (8, 6)
QUICK = (2, 2)
WARMUP_STEPS = 1
TEST_EXAMPLES = 2
# One fixed answer for every prompt: realistic assistant prose, about 100 words.
ANSWER = (
    "Here is a practical way to approach it. First, make sure you understand exactly what "
    "you want to achieve and what constraints you have, such as time, budget or tools. "
    "Next, break the task into small steps and tackle them one at a time, checking the "
    "result of each step before moving on. If something does not work as expected, look "
    "at the simplest explanation first and change one thing at a time. Finally, write down "
    "what worked so you can repeat it later. If you share more details about your "
    "situation, I can give you more specific advice."
)


class QuietContext(StageContext):
    """The stage's context without tqdm bars; records a timestamp at every progress update.

    The stage calls ``update(start)`` once before its first step and ``update(1)`` after
    every optimizer step, so ``stamps[k]`` is (wall, process CPU) after step k.
    """

    stamps: list[tuple[float, float]]

    @contextlib.contextmanager
    def progress(self, total: int, desc: str, unit: str = "req"):
        self.stamps = []
        yield lambda n: self.stamps.append((time.perf_counter(), time.process_time()))


@dataclass
class Result:
    mode: str
    batch: int
    steps: int
    steps_timed: str  # which optimizer steps the seconds cover, 1-based
    tokens: int  # non-padding tokens in those steps
    seconds: float
    cpu_cores_used: float | None  # process CPU time / wall time while timed: drops when others compete
    baseline: str  # the plain row this one is compared with (same steps)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def window(label: str, batch: int, stamps: list[tuple[float, float]], first: int, last: int,
           step_tokens: list[int], baseline: str) -> Result:
    """The steps first..last (1-based) from per-step stamps; stamps[0] is before step 1."""
    wall = stamps[last][0] - stamps[first - 1][0]
    cpu = stamps[last][1] - stamps[first - 1][1]
    return Result(label, batch, last - first + 1, f"{first}-{last}", sum(step_tokens[first - 1:last]),
                  wall, cpu / wall, baseline)


# -- data -----------------------------------------------------------------------------


def conversations(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """SFT records: helpful prompts (train split, then test, reused cyclically) + ANSWER."""
    sets = load_prompt_set(PROMPT_SET)
    prompts = sets["train"] + sets["test"]

    def record(k: int) -> dict:
        p = prompts[k % len(prompts)]
        return {"id": f"{p.id}/{k}", "source": "helpful", "messages": p.messages + [{"role": "assistant", "content": ANSWER}]}

    return [record(k) for k in range(n_train)], [record(len(prompts) - 1 - k) for k in range(n_test)]


def prepare_run_dir(run_dir: Path, train: list[dict], test: list[dict], overrides: list[str]) -> RunConfig:
    """A run directory with a finished-looking critique_revision stage holding our SFT data."""
    cr = run_dir / "critique_revision"
    (cr / "sft").mkdir(parents=True, exist_ok=True)
    write_jsonl(cr / "sft" / "train.jsonl", train)
    write_jsonl(cr / "sft" / "test.jsonl", test)
    write_json(cr / "manifest.json", {
        "stage": "critique_revision", "status": "complete",
        "note": "synthetic SFT data written by benchmarks/bench_sft.py",
        "counts": {"sft_train": len(train), "sft_test": len(test)},
    })
    return load_config(None, [f"run_dir={run_dir}", "stages=[sft]", *overrides])


def trainable_checkpoint(model_dir: str, folder: Path) -> tuple[str, str | None]:
    """``model_dir``, or a copy of it without a leftover GGUF ``quantization_config``.

    The embedded checkpoint's config.json still carries the ``quantization_config`` of
    the GGUF it was converted from; transformers then attaches a GGUF quantizer to the
    loaded (plain float32) model and refuses ``save_pretrained``, which the stage calls
    at the end. The copy (symlinked weights, cleaned config) loads the same float32
    weights into the same modules; both modes train it. Returns the path and a note.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" not in config:
        return model_dir, None
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return str(folder), (
        f"{model_dir}/config.json carries a GGUF quantization_config, so sft.run could not save_pretrained "
        f"the trained model; both modes train a copy without it ({folder}: same float32 weights, symlinked)"
    )


# -- the two modes --------------------------------------------------------------------


def plain_loop(model_dir: str, cfg: RunConfig, train: list[dict], batches: list[list[int]]):
    """The minimal loop; returns per-step stamps (stamps[0] before step 1) and losses."""
    import torch
    from transformers import AutoModelForCausalLM

    sc = cfg.sft
    model, tok, device = load_model_and_tokenizer(model_dir, device="cpu", dtype="float32", model_cls=AutoModelForCausalLM)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sc.learning_rate, weight_decay=sc.weight_decay)
    pad_id = tok.pad_token_id
    losses = []
    stamps = [(time.perf_counter(), time.process_time())]
    for idx in batches:
        batch = pad_batch([train[i] for i in idx], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = token_loss(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, sc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        stamps.append((time.perf_counter(), time.process_time()))
    del model, optimizer, params
    gc.collect()
    return stamps, [float(x) for x in losses]


def cai_run(cfg: RunConfig):
    """``cai.stages.sft.run`` on the prepared run directory, timed as a whole."""
    run_dir = Path(cfg.run_dir)
    out = run_dir / "sft.bench"
    shutil.rmtree(out, ignore_errors=True)  # no checkpoint from an earlier run to resume
    out.mkdir(parents=True)
    ctx = QuietContext(cfg=cfg, run_dir=run_dir, out=out, name=stage.STAGE.name, log=log)
    counts, seconds, cores_used = timed(lambda: stage.run(ctx))
    losses = [loss for _, loss in json.loads((out / "metrics.json").read_text(encoding="utf-8"))["loss"]]
    return counts, seconds, cores_used, ctx.stamps, losses


# -- reporting ------------------------------------------------------------------------


def markdown_table(results: list[Result]) -> str:
    base = {r.mode: r for r in results}
    lines = [
        "| mode | batch | steps | steps timed | tokens | seconds | tokens/s | ratio vs plain | cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cores = f"{r.cpu_cores_used:.2f}" if r.cpu_cores_used is not None else "n/a"
        ratio = r.tokens_per_s / base[r.baseline].tokens_per_s
        lines.append(
            f"| {r.mode} | {r.batch} | {r.steps} | {r.steps_timed} | {r.tokens} | {r.seconds:.2f} "
            f"| {r.tokens_per_s:.1f} | {ratio:.2f}x | {cores} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"batch {QUICK[0]}, {QUICK[1]} timed steps (a minute or two)")
    ap.add_argument("--batch-size", type=int, help=f"sequences per optimizer step (default {FULL[0]})")
    ap.add_argument("--steps", type=int, help=f"timed optimizer steps after {WARMUP_STEPS} warm-up step (default {FULL[1]})")
    ap.add_argument("--order", choices=("plain-first", "cai-first"), default="plain-first",
                    help="which mode runs first (default plain-first)")
    ap.add_argument("--no-process-warmup", dest="process_warmup", action="store_false",
                    help="skip the untimed plain step (on a separate model copy) that warms up the process first")
    ap.add_argument("--seed", type=int, default=0, help="seed of the batch order (the stage's cfg.seed)")
    ap.add_argument("--run-dir", type=Path, help="keep the prepared run directory here (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    batch_size, steps = (
        given if given is not None else default
        for given, default in zip((args.batch_size, args.steps), QUICK if args.quick else FULL)
    )
    total_steps = WARMUP_STEPS + steps
    cores = usable_cores()
    load_before = os.getloadavg()
    wall_start = time.perf_counter()

    with contextlib.ExitStack() as stack:
        run_dir = args.run_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cai-bench-sft-")))
        run_dir = run_dir.resolve()
        embedded = resolve_model("default", progress=log)
        model_dir, checkpoint_note = trainable_checkpoint(embedded, run_dir / "base-model")
        if checkpoint_note:
            log(f"NOTE: {checkpoint_note}")
        overrides = [
            f"seed={args.seed}", f"engine.model={model_dir if checkpoint_note else 'default'}", "engine.device=cpu",
            "sft.method=full", "sft.dtype=float32", "sft.epochs=1", "sft.grad_accum=1", "sft.warmup_steps=0",
            f"sft.batch_size={batch_size}", f"sft.max_steps={total_steps}", "sft.checkpoint_every=1000000",
        ]
        train_recs, test_recs = conversations(batch_size * total_steps, TEST_EXAMPLES)
        cfg = prepare_run_dir(run_dir, train_recs, test_recs, overrides)
        sc = cfg.sft

        # The stage's examples (its own loader) must be what encode_chat gives us.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        train = [encode_chat(tok, r["messages"], sc.max_length) for r in train_recs]
        stage_train, dropped = stage.load_examples(tok, run_dir / "critique_revision" / "sft" / "train.jsonl", sc.max_length)
        if dropped or stage_train != train:
            raise SystemExit("the stage's load_examples does not reproduce encode_chat on the benchmark data")
        batches = batches_for_epochs(len(train), sc.batch_size, sc.epochs, cfg.seed)[:total_steps]
        assert len(batches) == total_steps and all(len(b) == batch_size for b in batches)
        step_tokens = [sum(len(train[i]["input_ids"]) for i in b) for b in batches]  # = attention_mask.sum()
        padded = sum(batch_size * max(len(train[i]["input_ids"]) for i in b) for b in batches)
        lengths = sorted(len(e["input_ids"]) for e in train)
        log(f"model {model_dir}; {len(train)} examples of {lengths[0]}-{lengths[-1]} tokens "
            f"(median {lengths[len(lengths) // 2]}), batch {batch_size}, {WARMUP_STEPS} warm-up + {steps} timed steps, "
            f"{sum(step_tokens)} tokens ({sum(step_tokens) / padded:.0%} of the padded batches); "
            f"torch threads {cores}")

        measured: dict = {}

        def measure_plain() -> None:
            log("  plain loop ...")
            measured["plain"] = plain_loop(model_dir, cfg, train, batches)
            stamps = measured["plain"][0]
            log(f"  plain: {sum(step_tokens[WARMUP_STEPS:]) / (stamps[-1][0] - stamps[WARMUP_STEPS][0]):.1f} tok/s over "
                f"steps {WARMUP_STEPS + 1}-{total_steps}")

        def measure_cai() -> None:
            log("  cai sft stage ...")
            threads_before = usable_cores()
            measured["cai"] = cai_run(cfg)
            measured["threads"] = [threads_before, usable_cores()]
            counts, run_seconds, _, stamps, _ = measured["cai"]
            log(f"  cai: {sum(step_tokens[WARMUP_STEPS:]) / (stamps[-1][0] - stamps[WARMUP_STEPS][0]):.1f} tok/s over "
                f"steps {WARMUP_STEPS + 1}-{total_steps}, stage reports {counts['train_tokens_per_s']} tok/s, "
                f"whole run() {run_seconds:.1f} s")

        if args.process_warmup:
            # One untimed plain step on a model loaded and dropped: the process's one-time costs
            # (allocator growth, kernel selection) then fall on neither mode.
            log("  process warm-up (untimed): one plain step ...")
            plain_loop(model_dir, cfg, train, batches[:1])
            gc.collect()
        for measure in (measure_plain, measure_cai) if args.order == "plain-first" else (measure_cai, measure_plain):
            measure()
            gc.collect()

    plain_stamps, plain_losses = measured["plain"]
    counts, run_seconds, run_cores, cai_stamps, cai_losses = measured["cai"]
    threads_before, threads_after = measured["threads"]
    if len(cai_stamps) != total_steps + 1:
        raise SystemExit(f"expected {total_steps + 1} progress updates from the stage, got {len(cai_stamps)}")
    plain = window("plain", batch_size, plain_stamps, WARMUP_STEPS + 1, total_steps, step_tokens, "plain")
    plain_all = window("plain, incl. warm-up", batch_size, plain_stamps, 1, total_steps, step_tokens, "plain, incl. warm-up")
    cai = window("cai", batch_size, cai_stamps, WARMUP_STEPS + 1, total_steps, step_tokens, "plain")
    reported = counts["train_tokens_per_s"]
    cai_reported = Result("cai, stage-reported train_tokens_per_s", batch_size, total_steps, f"1-{total_steps}",
                          sum(step_tokens), sum(step_tokens) / reported, None, "plain, incl. warm-up")
    cai_whole = Result("cai, whole run() call", batch_size, total_steps, f"1-{total_steps} + overhead",
                       sum(step_tokens), run_seconds, run_cores, "plain, incl. warm-up")
    wall = time.perf_counter() - wall_start
    load_after = os.getloadavg()
    results = [plain, cai, plain_all, cai_reported, cai_whole]

    loss_diff = max(abs(a - b) for a, b in zip(plain_losses, cai_losses)) if len(plain_losses) == len(cai_losses) else None
    training_loop_s = cai_stamps[-1][0] - cai_stamps[0][0]
    summary = {
        "cai_vs_plain_tokens_per_s": cai.tokens_per_s / plain.tokens_per_s,
        "goal_cai_vs_plain": 0.9,
        "meets_goal": cai.tokens_per_s / plain.tokens_per_s >= 0.9,
        "stage_reported_vs_plain_incl_warmup": cai_reported.tokens_per_s / plain_all.tokens_per_s,
        "whole_run_vs_plain_incl_warmup": cai_whole.tokens_per_s / plain_all.tokens_per_s,
        "stage_reported_train_tokens_per_s": reported,
        "stage_run_seconds": run_seconds,
        "stage_training_loop_seconds": training_loop_s,
        "stage_outside_training_loop_seconds": run_seconds - training_loop_s,
        "warmup_step_seconds": {"plain": plain_stamps[1][0] - plain_stamps[0][0], "cai": cai_stamps[1][0] - cai_stamps[0][0]},
        "per_step_seconds": {
            "plain": [b[0] - a[0] for a, b in zip(plain_stamps, plain_stamps[1:])],
            "cai": [b[0] - a[0] for a, b in zip(cai_stamps, cai_stamps[1:])],
        },
        "losses": {"plain": plain_losses, "cai": cai_losses},
        "max_abs_loss_difference": loss_diff,
        "torch_threads_before_after_stage": [threads_before, threads_after],
        "stage_counts": counts,
    }

    print(f"\nSL-CAI SFT training throughput, SmolLM2-135M-Instruct, full fine-tuning in float32 on CPU, "
          f"batch {batch_size}, {WARMUP_STEPS} warm-up + {steps} timed optimizer steps, {len(train)} examples "
          f"({PROMPT_SET} prompts + a fixed ~100-word answer), {args.order}{' (quick)' if args.quick else ''}\n")
    print(markdown_table(results))
    print()
    print(f"cai / plain tokens/s (steps {plain.steps_timed}, same batches, warm-up step excluded): "
          f"{summary['cai_vs_plain_tokens_per_s']:.2f}x (goal >= 0.90: {'met' if summary['meets_goal'] else 'NOT met'})")
    print("tokens = non-padding tokens. 'plain' and 'cai' time the same steps after one warm-up step (the stage's "
          "loop through its per-step progress callback); the stage-reported number is its own train_tokens_per_s, "
          "which includes the warm-up step (so compare it with 'plain, incl. warm-up'); 'whole run()' adds model "
          f"loading, tokenization, held-out loss before/after on {len(test_recs)} examples, saving and plotting "
          f"({summary['stage_outside_training_loop_seconds']:.1f} s of {run_seconds:.1f} s outside the training loop).")
    print(f"warm-up step (step 1): plain {summary['warmup_step_seconds']['plain']:.2f} s, "
          f"cai {summary['warmup_step_seconds']['cai']:.2f} s; " + (
              "an untimed plain step on a separate model copy warmed up the process before both modes, so step 1 "
              "holds only each mode's own first-step costs (e.g. AdamW state allocation)" if args.process_warmup else
              f"no process warm-up: with {args.order}, the first mode's step 1 also pays the process's one-time costs, "
              "so the rows that include step 1 depend on --order"
          ) + f"; modes ran {args.order}")
    if loss_diff is None:
        print(f"per-step losses: DIFFERENT step counts (plain {len(plain_losses)}, cai {len(cai_losses)})")
    else:
        print(f"per-step losses agree to {loss_diff:.2e} (same examples, batches and updates in both modes)")
    if checkpoint_note:
        print(f"NOTE: {checkpoint_note}")
    if threads_before != threads_after:
        print(f"NOTE: torch threads changed during the stage run: {threads_before} -> {threads_after}")
    print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; total wall time {wall:.0f} s")
    warning = starved_warning(cores, [(r.mode, r.cpu_cores_used) for r in results if r.cpu_cores_used is not None])
    if warning:
        print(warning)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(
        args.out,
        model={"name": "SmolLM2-135M-Instruct", "checkpoint": embedded, "trained_copy": model_dir if checkpoint_note else None,
                  "note": checkpoint_note},
        settings={
            "quick": args.quick, "order": args.order, "process_warmup": args.process_warmup, "seed": cfg.seed, "batch_size": batch_size, "warmup_steps_excluded": WARMUP_STEPS,
            "timed_steps": steps, "train_examples": len(train), "test_examples": len(test_recs),
            "prompt_set": PROMPT_SET, "answer_words": len(ANSWER.split()), "dtype": "float32", "device": "cpu",
            "learning_rate": sc.learning_rate, "weight_decay": sc.weight_decay, "max_grad_norm": sc.max_grad_norm,
            "max_length": sc.max_length, "non_padding_tokens": sum(step_tokens), "padded_tokens": padded,
            "stage_overrides": overrides,
        },
        load_before=load_before, load_after=load_after, wall=wall, results=results, summary=summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
