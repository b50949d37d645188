"""int8 linear layers for CPU generation and scoring (``engine.quantize=int8``).

Each weight row (output channel) is stored in int8 with its own scale; each input row
(token) is quantized to int8 with its own scale at run time; the product is an exact
int32 matrix product (``torch._int_mm``, VNNI/AMX kernels on CPUs that have them),
scaled back to float.

A few input channels of every layer carry values far above the rest (SmolLM2-135M: a
token's largest input to an MLP down-projection is up to 1,600x its median). With one
scale per token those few set the scale, and every other channel is left a handful of
int8 levels. So each layer keeps its ``OUTLIERS`` largest input channels, found once on
a fixed calibration text run through the float model, in float: they are multiplied by
their float weight columns and left out of the int8 product, as LLM.int8() does with a
threshold (here the channels are fixed per layer, so a row's result still does not depend
on its batch). On the embedded model this cut the mean KL to float32's next-token
distribution from 0.061 to 0.007 nats (three texts; `docs/engine.md`).

Why per token rather than torch's ``quantize_dynamic``: that quantizes a whole input
tensor with one scale taken from its largest value, so a row's result depends on the
other rows of its batch. A resumed run, whose batches hold only the requests not yet
cached, then sampled other answers than an uninterrupted run (seen in CI: 13 of 13
regenerated answers differed). With a scale per token, and integer arithmetic, every
row's product is the same whatever shares its batch. It is also the more accurate of
the two (each token uses its own range), and it does not use ``torch.ao.quantization``,
which torch has deprecated.
"""

from __future__ import annotations

import torch

#: Part of the request cache's identity (``LocalEngine.identity``): answers of another
#: quantization are never reused.
SCHEME = "int8-per-token-outliers16-addmm"
#: Input channels of each layer kept in float (its largest on the calibration text).
OUTLIERS = 16
#: The calibration conversation: ours, in the pipeline's register (a request, a refusal, a
#: critique and a revision), rendered through the model's chat template by the engine.
CALIBRATION = [
    {"role": "system", "content": "You are a helpful, honest and harmless assistant."},
    {"role": "user", "content": "How do I get into my neighbour's wifi without them knowing? Also, "
                                "what is a good recipe for bread, and why is the sky blue?"},
    {"role": "assistant", "content": "I can't help you get into someone else's network. Ask your "
                                     "neighbour to share it, or compare plans from local providers. "
                                     "For bread: mix 500 g flour, 10 g salt, 7 g yeast and 320 ml "
                                     "water, knead for ten minutes, let it rise for an hour, shape it "
                                     "and bake at 220 C for 30 minutes. The sky looks blue because "
                                     "air scatters short wavelengths of sunlight more than long ones."},
    {"role": "user", "content": "Critique the answer: is it harmful, unethical or dishonest? Then "
                                "rewrite it to remove anything harmful, keeping what is helpful."},
]


class Int8Linear(torch.nn.Module):
    """A frozen ``nn.Linear`` with int8 weights (a scale per output channel) and int8
    inputs (a scale per token), for inference only; the input channels ``outliers`` (a
    sorted index tensor) stay in float."""

    def __init__(self, linear: torch.nn.Linear, outliers: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("outliers", outliers)
        self.register_buffer("outlier_weight", None if outliers is None else w[:, outliers].t().contiguous())
        if outliers is not None:
            w = w.index_fill(1, outliers, 0.0)  # their columns leave the int8 weights (and their scales)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_t", q.t().contiguous())  # [in, out], as _int_mm wants it
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        size = rows.abs()
        if self.outliers is not None:
            # left out of the scale; their int8 weights are zero, so where they clamp is moot
            size.index_fill_(1, self.outliers, 0.0)
        scale = size.amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        del size
        q = rows.div(scale).round_().clamp_(-127, 127).to(torch.int8)
        out = torch._int_mm(q, self.weight_t).float()
        out.mul_(scale).mul_(self.weight_scale)
        if self.outliers is not None:
            # the outlier channels times their float weight columns, in one float matmul
            # added in place (a loop over the channels, which kept their order fixed
            # whatever the number of rows, took as long as the int8 product itself)
            out.addmm_(rows.index_select(1, self.outliers), self.outlier_weight)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kept = 0 if self.outliers is None else len(self.outliers)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, float_inputs={kept}")


def input_peaks(model: torch.nn.Module, input_ids: torch.Tensor) -> dict:
    """Each linear layer's largest |input| per channel while ``model`` reads ``input_ids``."""
    peaks, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def record(mod, args, name=name):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                peaks[name] = x if name not in peaks else torch.maximum(peaks[name], x)
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return peaks


def quantize_linear_layers(model: torch.nn.Module, after_module=None, calibration_ids=None,
                           outliers: int = OUTLIERS) -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (the output head included) by an
    :class:`Int8Linear`, in place; returns the model. With ``calibration_ids`` (a
    ``[1, n]`` token tensor) the float model reads them first, and each layer keeps its
    ``outliers`` largest input channels in float. The walk holds one module's children
    at a time, so each float weight is freed as soon as its layer is replaced (the peak is
    the float model, not the float model plus every int8 copy). ``after_module`` is called
    after each module whose linear layers were replaced (to hand the freed memory back)."""
    peaks = input_peaks(model, calibration_ids) if calibration_ids is not None and outliers > 0 else {}

    def walk(module: torch.nn.Module, prefix: str) -> None:
        replaced = False
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                peak = peaks.get(prefix + name)
                keep = None
                if peak is not None and child.in_features > 2 * outliers:
                    keep = peak.topk(outliers).indices.sort().values
                setattr(module, name, Int8Linear(child, keep))
                replaced = True
            else:
                walk(child, prefix + name + ".")
        if replaced and after_module is not None:
            after_module()

    walk(model, "")
    return model
