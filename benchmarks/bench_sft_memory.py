"""Where an SFT step's memory goes: anonymous resident memory at each point of the widest
batch's steps, and the tensors autograd keeps for the backward pass, by kind.

Loads the model as the ``sft`` stage does (its dtype, method, checkpointing), builds its
batches from a run's critique_revision output the way the stage does
(shuffled batches of ``sft.batch_size``, micro-batches of ``batch_size / grad_accum``),
takes the micro-batch with the most padded tokens and runs two optimizer steps on it, reading
``RssAnon`` after the load, after AdamW's set-up, after each forward, loss, backward and
optimizer step, and its peak within each phase (a thread samples it every 5 ms). The
tensors saved for backward are counted with ``torch.autograd.graph.saved_tensors_hooks``
(each storage once; weights and their autocast copies apart). Then prints what
``cai.memory.training`` estimates for the same batch, part by part.

    HF_HUB_OFFLINE=1 python benchmarks/bench_sft_memory.py --run RUN_DIR --config cpu-full [KEY=VALUE ...]

Writes ``benchmarks/results/sft_memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import _common

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sft_memory.json"
MiB = 1 << 20


def anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    """The highest ``RssAnon`` since the last :meth:`mark`, sampled every 5 ms."""

    def __init__(self):
        self.high = anon()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.high = max(self.high, anon())
            time.sleep(0.005)

    def mark(self) -> tuple[int, int]:
        now = anon()
        high, self.high = max(self.high, now), now
        return now, high


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder holding critique_revision's sft data")
    ap.add_argument("--config", default="cpu-full")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    opts = ap.parse_args()

    import torch

    from cai.config import load_config
    from cai.io import read_jsonl

    peak = Peak()
    base = anon()
    points: list[dict] = []

    def point(name: str, **extra) -> None:
        now, high = peak.mark()
        points.append({"point": name, "anon_mib": (now - base) / MiB, "peak_since_last_mib": (high - base) / MiB,
                       **extra})
        _common.log(f"{name:<28} now +{(now - base) / MiB:7.0f} MiB   peak in phase +{(high - base) / MiB:7.0f} MiB"
                    + "".join(f"   {k} {v}" for k, v in extra.items()))

    cfg = load_config(opts.config, [f"run_dir={opts.run}", *opts.overrides])
    sc = cfg.sft
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from cai.models import resolve_model
    from cai.stages.sft import load_examples
    from cai.training import batches_for_epochs, load_trainable, optimizer_and_batches, pad_batch, token_loss

    rows = read_jsonl(opts.run / "critique_revision" / "sft" / "train.jsonl")
    accelerator = Accelerator(cpu=True)
    path = resolve_model(sc.model or cfg.engine.model, cfg.engine.revision, progress=_common.log)
    point("start")
    model, tok, prec = load_trainable(path, sc, accelerator.device, cfg.engine.trust_remote_code,
                                      AutoModelForCausalLM, "sft", _common.log, seed=cfg.seed)
    point("model loaded", precision=prec.name)
    train, dropped = load_examples(tok, rows, sc.max_length)
    micro = max(1, sc.batch_size // sc.grad_accum)
    lengths = [len(e["input_ids"]) for e in train]
    batches = batches_for_epochs(len(train), sc.batch_size, sc.epochs, cfg.seed)
    micros = [b[i:i + micro] for b in batches for i in range(0, len(b), micro)]
    widest = max(micros, key=lambda m: len(m) * max(lengths[i] for i in m))  # the most padded tokens
    width = max(lengths[i] for i in widest)
    _common.log(f"{len(train)} examples ({dropped} dropped), tokens mean {sum(lengths) / len(lengths):.0f}, "
                f"max {max(lengths)}; micro-batch {micro}; widest micro-batch {len(widest)} x {width}")
    model, optimizer, params, _ = optimizer_and_batches(accelerator, model, sc, len(train), cfg.seed)
    point("AdamW set up")

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    vocab = model.get_input_embeddings().weight.shape[0]

    def saved_by_kind(run) -> dict:
        seen: dict[int, tuple[str, int]] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                if ptr in weights:
                    kind = "weights (not extra)"
                elif t.dim() == 2 and tuple(t.shape) in weight_shapes and t.dtype != torch.float32:  # (or transposed)
                    kind = f"autocast weight copies {t.dtype}"
                elif t.shape and t.shape[-1] == vocab:
                    kind = f"vocabulary-wide {t.dtype}"
                else:
                    kind = f"activations {t.dtype}"
                seen[ptr] = (kind, t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        kinds: dict[str, int] = {}
        for kind, n in seen.values():
            kinds[kind] = kinds.get(kind, 0) + n
        return out, {k: round(v / MiB, 1) for k, v in sorted(kinds.items())}

    batch = pad_batch([train[i] for i in widest], tok.pad_token_id, accelerator.device)
    for step in range(2):
        with prec.autocast():
            logits, saved_fwd = saved_by_kind(lambda: model(input_ids=batch["input_ids"],
                                                            attention_mask=batch["attention_mask"]).logits)
            point(f"step {step + 1}: forward", logits=f"{tuple(logits.shape)} {logits.dtype}")
            loss, saved_loss = saved_by_kind(lambda: token_loss(logits, batch["labels"]))
        del logits
        point(f"step {step + 1}: loss", saved_forward_mib=saved_fwd, saved_loss_mib=saved_loss)
        accelerator.backward(loss)
        del loss
        point(f"step {step + 1}: backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        point(f"step {step + 1}: AdamW step")

    from cai.memory import model_config, shape_of, training

    shape = shape_of(model_config(sc.model or cfg.engine.model, cfg.engine.revision))
    est = training(shape, prec, sc, len(widest), width)
    _common.log("cai.memory.training for this micro-batch: "
                + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in est.parts.items()) + f" = {est.total / MiB:.0f} MiB")
    measured = max(p["peak_since_last_mib"] for p in points)
    _common.log(f"measured peak +{measured:.0f} MiB over the start; plan / measured {est.total / MiB / measured:.2f}")
    report = {"what": "an SFT step's anonymous memory by point, and the saved tensors by kind",
              "config": opts.config, "overrides": opts.overrides, "machine": _common.machine_info(),
              "examples": len(train), "tokens_mean": sum(lengths) / len(lengths), "tokens_max": max(lengths),
              "widest_micro_batch": [len(widest), width], "points": points, "peak_mib": measured,
              "estimate_mib": {k: v / MiB for k, v in est.parts.items()}, "estimate_total_mib": est.total / MiB}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
