"""What a stage will cost, counted before it runs: the model ``cai plan`` adds up.

Each stage's ``estimate`` (``StageSpec.estimate``) turns :class:`PlanInputs` (the config,
its inputs, a token counter and how the engine batches) into a :class:`Cost`; the plan
(:mod:`cai.plan`) prices the counts with its calibration and checks the memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from cai.prompts import Prompt
from cai.stage_names import SL_CAI

if TYPE_CHECKING:  # pragma: no cover
    from cai.config import RunConfig
    from cai.engines.base import Batching


@dataclass
class Cost:
    """What a stage will do, counted before it runs (``cai plan``).

    ``generate``/``score`` count engine requests; the token counts assume every answer
    uses its whole budget. ``seconds`` comes later, from the plan's calibration.
    """

    generate: int = 0
    score: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0  # the engine's sequential decoding steps (Batching.decode_steps); 0: not counted
    train_tokens: int = 0
    note: str = ""
    # a training stage: its passes (each call costs a fixed part plus its tokens) and its fixed costs
    train_passes: int = 0  # forward+backward micro-batch passes (of train_tokens in all)
    steps: int = 0  # optimizer steps
    loads: int = 0  # models loaded from disk
    eval_tokens: int = 0  # no-grad forward tokens of a training model (held-out evaluation, reference passes)
    eval_passes: int = 0  # no-grad forward calls (of eval_tokens in all)
    policy_tokens: int = 0  # new tokens sampled by the training model itself (rl's rollouts), not the engine
    saves: int = 0  # save_pretrained models written (and hashed into the manifest)
    checkpoints: int = 0  # resumable checkpoints written (weights + AdamW state)
    figures: int = 0  # PNG figures drawn
    #: bytes the stage leaves on disk at its peak: saved models and one resumable checkpoint
    #: (training stages, :func:`training_disk`); the plan adds the request cache and data files
    disk_bytes: int = 0
    #: peak memory per process (a :class:`cai.memory.Memory`); None: nothing local to hold
    memory: object = None


def training_disk(params: int, prec, tc, saves: int, checkpoints: int) -> int:
    """A training stage's bytes on disk at its peak: ``saves`` whole models of ``params`` in
    the saved dtype (with LoRA the merged model, its adapter being small), and while it runs
    one resumable checkpoint: the trained weights and AdamW's two states."""
    from cai.memory import DTYPE_BYTES

    saved = DTYPE_BYTES.get(getattr(prec, "saved", "float32"), 4)
    trained = params if tc.method != "lora" else params // 100  # adapters: about 1% of the model
    checkpoint = 3 * trained * DTYPE_BYTES.get(getattr(prec, "weights", "float32"), 4) if checkpoints else 0
    return int(saves * params * saved + checkpoint)


def passes(items: float, micro: int, world: int = 1) -> int:
    """The micro-batch calls one process makes for ``items`` split over ``world`` processes."""
    return math.ceil(math.ceil(items / world) / max(1, micro)) if items > 0 else 0


#: Model shapes already built on the meta device, by (setting, revision).
_SHAPES: dict = {}


@dataclass
class PlanInputs:
    """What every stage's estimate reads: the config, its inputs and a token counter."""

    cfg: "RunConfig"
    constitution: object
    sets: dict  # set name -> {split: [Prompt]}
    count: Callable[[list[dict]], int]  # tokens of a conversation
    world: int = 1  # processes of the launch (each training stage's batch is split over them)
    device: str = "cpu"  # where the models run ('auto' resolved)

    @property
    def batching(self) -> "Batching":
        """How the run's engine batches its requests (the engine says: :func:`cai.engines.batching`)."""
        from cai.engines import batching

        return batching(self.cfg.engine)

    @property
    def local_batching(self) -> "Batching":
        """How a model batches in this process's local engine: what the memory estimates
        count (a served model's memory is its server's), and how rl samples its rollouts
        (the training policy in an in-process local engine)."""
        from cai.engines.local import LocalEngine

        e = self.cfg.engine
        return LocalEngine.batching_for(e.batch_size, e.score_batch_size)

    def capped(self, name: str, n: int | None) -> dict[str, list[Prompt]]:
        """A prompt set's splits, at most ``n`` prompts each (None: all). With the red-team
        prompts expanded, train also counts ``expand.count`` new prompts (at most that many
        are kept), stood in for by the seeds, whose lengths they resemble."""
        out = {s: (ps if n is None else ps[:n]) for s, ps in self.sets[name].items()}
        train = self.sets[name].get("train", [])
        if name == "red_team" and self.cfg.expand.count > 0 and train:
            out["train"] = out.get("train", []) + [train[k % len(train)] for k in range(self.cfg.expand.count)]
        return out

    def feedback_pairs(self, split: str = "train") -> float:
        """About how many comparisons of ``split`` the feedback stage will write."""
        fb = self.cfg.feedback
        reds = self.capped("red_team", fb.max_prompts)
        return len(reds.get(split, [])) * math.comb(fb.samples_per_prompt, 2) * (1 + fb.helpful_ratio)

    def own_rows(self, stage: str) -> dict[str, list[dict]] | None:
        """The rows of ``stage``'s own data file (``sft.data``...: :mod:`cai.datafiles`) by
        split; None when it reads the run's artifacts."""
        from cai.datafiles import outside_data, read_data

        return read_data(self.cfg, stage) if outside_data(self.cfg, stage) else None

    def training_pairs(self, stage: str, max_length: int) -> tuple[float, float, int, int]:
        """(train pairs, held-out pairs, tokens a sequence, tokens of the longest) of a stage that
        trains on pairs: its own file's when it has one, else about what the feedback stage will
        write (the longest: its longest prompt with a whole answer; a batch is padded to it)."""
        own = self.own_rows(stage)
        if own is None:
            fb = self.cfg.feedback
            reds = self.capped("red_team", fb.max_prompts)
            prompts = reds.get("train", []) + self.helpful_beside({"train": reds.get("train", [])}, fb.helpful_ratio)
            longest = max((self.count(p.messages) for p in prompts), default=60) + fb.max_new_tokens
            return (self.feedback_pairs(), self.feedback_pairs("test"),
                    min(fb.max_new_tokens + 60, max_length), min(longest, max_length))
        seqs = [self.count(r["prompt"] + r[k]) for r in own["train"] for k in ("chosen", "rejected")]
        length = sum(seqs) / max(1, len(seqs))
        return len(own["train"]), len(own["test"]), int(min(length, max_length)), min(max(seqs, default=0), max_length)

    # -- what memory estimates read (cai.memory) --

    def shape(self, setting: str | None):
        """The :class:`cai.memory.ModelShape` of a model setting (``sl-cai``: the model ``sft``
        fine-tunes, same shape), from its config alone; None for a remote engine's model or
        a model not on this machine."""
        from cai.memory import model_config, shape_of

        e = self.cfg.engine
        name = setting or e.model
        if name == SL_CAI:
            name = self.cfg.sft.model or e.model
        if e.kind != "local" and name == e.model:
            return None
        key = (name, e.revision)
        if key not in _SHAPES:
            config = model_config(name, e.revision, e.trust_remote_code)
            _SHAPES[key] = shape_of(config) if config is not None else None
        return _SHAPES[key]

    def engine_bytes(self) -> int:
        """Bytes per weight of the inference engine (``engine.dtype`` on this device)."""
        from cai.memory import DTYPE_BYTES
        from cai.models import pick_dtype

        return DTYPE_BYTES[str(pick_dtype(self.cfg.engine.dtype, self.device)).replace("torch.", "")]

    def helpful_beside(self, red: dict[str, list[Prompt]], ratio: float) -> list[Prompt]:
        """The helpfulness prompts mixed in beside ``red``: per split, ``ratio`` per red-team prompt."""
        helpful = self.sets["helpful"]
        return [p for s in red for p in helpful.get(s, [])[: min(len(helpful.get(s, [])), round(ratio * len(red[s])))]]
