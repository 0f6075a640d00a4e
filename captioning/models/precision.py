"""Decoder copies for faster captioning on a CPU: int8 weights, or bfloat16 matrix products.

Both keep the decoding arithmetic around the products (softmax, gates, attention, beam
scores) in float32, and leave the embeddings float, so the model's activations keep its dtype.
- `quantize_int8`: dynamic quantization of the Linear and LSTM-cell weights (torch.ao).
- `bfloat16_products`: the same layers, and a transformer's attention projections, multiply in
  bfloat16; the vocabulary projections stay float32. On CPUs with bfloat16 matrix units (AMX, AVX512-BF16) such a product is several
  times faster than in float32; the inputs are rounded to bfloat16, the sums accumulate in
  float32 and the bias is added in float32.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from captioning.models.base import CaptionModel

LOW = torch.bfloat16
MIN_OUTPUTS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a float or a bfloat16 weight; the result has x's dtype."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return out if bias is None else out + bias


class Bfloat16Linear(nn.Module):
    """An nn.Linear whose weight is held in bfloat16 (as a buffer: not a trainable parameter)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight", layer.weight.detach().to(LOW))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Bfloat16LSTMCell(nn.Module):
    """nn.LSTMCell's arithmetic, with its two products as one bfloat16 product."""

    def __init__(self, cell: nn.LSTMCell):
        super().__init__()
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        weight = torch.cat([cell.weight_ih.detach(), cell.weight_hh.detach()], dim=1)
        self.register_buffer("weight", weight.to(LOW))
        self.register_buffer("bias", (cell.bias_ih + cell.bias_hh).detach().float())

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = linear(torch.cat([x, h], dim=-1), self.weight, self.bias)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def bfloat16_products(model: nn.Module) -> nn.Module:
    """A copy of `model` for decoding whose Linear, LSTM-cell and attention-projection weights
    are bfloat16 (see the module docstring); `model` is unchanged."""
    model = copy.deepcopy(model)
    # The vocabulary projections stay float32: their outputs are the word scores the beam ranks,
    # and bfloat16 would round each to about 3 digits (lower validation scores, reports/RESULTS.md).
    keep = {id(module.output) for module in model.modules() if isinstance(module, CaptionModel)}
    for module in list(model.modules()):
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weight = module.in_proj_weight.detach().to(LOW)
            del module.in_proj_weight
            module.register_buffer("in_proj_weight", weight)
        for name, child in list(module.named_children()):
            # A layer with a handful of outputs (a gate, an attention score) is a matrix-vector
            # product: bfloat16 would only add a rounding pass over its (large) input.
            if isinstance(child, nn.Linear) and child.out_features >= MIN_OUTPUTS and id(child) not in keep:
                setattr(module, name, Bfloat16Linear(child))
            elif isinstance(child, nn.LSTMCell):
                setattr(module, name, Bfloat16LSTMCell(child))
    return model.eval()


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` whose Linear and LSTM-cell weights are int8 (dynamic quantization: the
    activations are quantized on the fly), for decoding on a CPU; the embeddings stay float."""
    with warnings.catch_warnings():
        # torch marks eager-mode quantization as deprecated in favour of torchao, which the
        # image does not carry; the API still works in the versions pinned here.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTMCell}, dtype=torch.qint8)
