"""int8 linear layers for CPU generation and scoring (``engine.quantize=int8``).

Each weight row (output channel) is stored in int8 with its own scale; each input row
(token) is quantized to int8 with its own scale at run time; the product is an exact
int32 matrix product (``torch._int_mm``, VNNI/AMX kernels on CPUs that have them),
scaled back to float.

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
SCHEME = "int8-per-token"


class Int8Linear(torch.nn.Module):
    """A frozen ``nn.Linear`` with int8 weights (a scale per output channel) and int8
    inputs (a scale per token), for inference only."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", q.t().contiguous())  # [in, out], as _int_mm wants it
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12) / 127.0
        q = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
        out = torch._int_mm(q, self.weight_t).float()
        out.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linear_layers(model: torch.nn.Module, after_module=None) -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (the output head included) by an
    :class:`Int8Linear`, in place; returns the model. The walk holds one module's children
    at a time, so each float weight is freed as soon as its layer is replaced (the peak is
    the float model, not the float model plus every int8 copy). ``after_module`` is called
    after each module whose linear layers were replaced (to hand the freed memory back)."""

    def walk(module: torch.nn.Module) -> None:
        replaced = False
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear(child))
                replaced = True
            else:
                walk(child)
        if replaced and after_module is not None:
            after_module()

    walk(model)
    return model
