"""A small transformer decoder that cross-attends over the spatial image features."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioning.models.base import CaptionModel, State, rows_per_image
from captioning.models.precision import linear
from captioning.vocab import PAD

# Learned embeddings for up to this many feature positions (7x7 = 49 for the encoders here).
MAX_POSITIONS = 256


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sinusoidal encodings (len(positions), dim) (Vaswani et al., 2017)."""
    half = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
    angles = positions.float()[:, None] * torch.exp(-math.log(10000.0) * half / dim)[None]
    table = torch.zeros(len(positions), dim, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


class TransformerCaptioner(CaptionModel):
    """Pre-norm `nn.TransformerDecoder` of width `hidden_dim` over projected features.

    `forward` runs the whole caption with a causal mask. `step` is incremental: the state
    (batch first) holds each layer's projected image keys/values and the self-attention
    keys/values of the words so far, so each step computes only the newest position; it
    returns the last layer's cross-attention averaged over heads.
    """

    name = "transformer"

    def __init__(self, config: dict[str, Any], vocab_size: int, feature_dim: int):
        super().__init__(config, vocab_size, feature_dim)
        width = config["hidden_dim"]
        self.width = width
        self.feature_proj = nn.Linear(feature_dim, width)
        self.feature_pos = nn.Parameter(torch.zeros(MAX_POSITIONS, width))
        nn.init.normal_(self.feature_pos, std=0.02)
        self.feature_norm = nn.LayerNorm(width)
        self.embedding = nn.Embedding(vocab_size, width, padding_idx=PAD)
        # Scaled by sqrt(width) in `_embed`: start at unit size, comparable to the positions.
        nn.init.normal_(self.embedding.weight, std=width**-0.5)
        with torch.no_grad():
            self.embedding.weight[PAD].zero_()
        self.dropout = nn.Dropout(config["dropout"])
        layer = nn.TransformerDecoderLayer(
            width, config["heads"], config["ff_dim"], config["dropout"], batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, config["layers"])
        self.final_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, vocab_size)
        self.static_keys = tuple(f"cross_{kv}{i}" for i in range(config["layers"]) for kv in "kv")
        self.shared_static = True

    def _memory(self, features: torch.Tensor) -> torch.Tensor:
        features = self.prepare(features)
        if features.size(1) > MAX_POSITIONS:
            raise ValueError(f"{features.size(1)} feature positions, the transformer supports {MAX_POSITIONS}")
        memory = self.feature_proj(features) + self.feature_pos[: features.size(1)]
        return self.dropout(self.feature_norm(memory))

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.size(1), device=tokens.device)
        embedded = self.embedding(tokens)
        x = embedded * math.sqrt(self.width) + sinusoid(positions, self.width).to(embedded.dtype)
        return self.dropout(x)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self._memory(features)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.size(1), device=tokens.device)
        if tokens.size(0) == memory.size(0):
            x = self.decoder(self._embed(tokens, 0), memory, tgt_mask=mask, tgt_is_causal=True)
        else:
            x = self._decode_shared(self._embed(tokens, 0), memory, mask)
        logits = self.output(self.final_norm(x))
        return logits, logits.new_zeros(())

    def _decode_shared(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The pre-norm decoder layers for k adjacent caption rows per image row of `memory`:
        each image's cross-attention keys and values are projected once for its k captions
        (same weights and result as `self.decoder` on memory repeated k times)."""
        for layer in self.decoder.layers:
            normed = layer.norm1(x)
            attended = layer.self_attn(normed, normed, normed, attn_mask=mask, is_causal=True, need_weights=False)[0]
            x = x + layer.dropout1(attended)
            cross = layer.multihead_attn
            keys, values = self._heads(cross, memory, 1), self._heads(cross, memory, 2)
            attended, _ = self._cross(cross, layer.norm2(x), keys, values, cross.dropout if self.training else 0.0)
            x = x + layer.dropout2(attended)
            hidden = layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))
            x = x + layer.dropout3(layer.linear2(hidden))
        return x

    def init_state(self, features: torch.Tensor) -> State:
        memory = self._memory(features)
        state: State = {}
        for i, layer in enumerate(self.decoder.layers):
            # The image side of cross-attention is the same at every step: project it once.
            attention = layer.multihead_attn
            # Contiguous: every step's batched products then read them without a copy.
            state[f"cross_k{i}"] = self._heads(attention, memory, 1).contiguous()
            state[f"cross_v{i}"] = self._heads(attention, memory, 2).contiguous()
            empty = state[f"cross_k{i}"][:, :, :0]
            state[f"self_k{i}"], state[f"self_v{i}"] = empty, empty
        return state

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        """The pre-norm decoder layers for the newest position only, with the keys and values
        of earlier positions cached (same weights and result as `forward`)."""
        x = self._embed(prev_tokens[:, None], state["self_k0"].size(2))  # (B, 1, D)
        new_state = dict(state)
        weights = None
        for i, layer in enumerate(self.decoder.layers):
            query, key, value = self._projections(layer.self_attn, layer.norm1(x))
            keys = torch.cat([state[f"self_k{i}"], key], dim=2)
            values = torch.cat([state[f"self_v{i}"], value], dim=2)
            new_state[f"self_k{i}"], new_state[f"self_v{i}"] = keys, values
            attended, _ = self._attend(layer.self_attn, query, keys, values)
            x = x + layer.dropout1(attended)
            cross = layer.multihead_attn
            attended, weights = self._cross(cross, layer.norm2(x), state[f"cross_k{i}"], state[f"cross_v{i}"])
            x = x + layer.dropout2(attended)
            hidden = layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))
            x = x + layer.dropout3(layer.linear2(hidden))
        logits = self.output(self.final_norm(x[:, 0]))
        return F.log_softmax(logits, dim=-1), new_state, weights.mean(dim=1).reshape(x.size(0), -1)

    def _cross(
        self,
        attention: nn.MultiheadAttention,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention of x (rows, T, D) over image keys and values with one row per image
        for k adjacent rows of x (an image's captions, or its beams): an image's k rows attend as
        one query sequence of k * T positions, without repeating its keys k times. Returns the
        output (rows, T, D) and the weights (images, heads, k * T, N)."""
        rows, length, width = x.shape
        images = keys.size(0)
        k = rows_per_image(rows, images)
        query = self._heads(attention, x.reshape(images, k * length, width), 0)
        attended, weights = self._attend(attention, query, keys, values, dropout)
        return attended.reshape(rows, length, width), weights

    @staticmethod
    def _projections(attention: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Query, key and value projections of x (B, L, D) in one product, each (B, heads, L, D/heads)."""
        projected = linear(x, attention.in_proj_weight, attention.in_proj_bias)
        projected = projected.view(x.size(0), x.size(1), 3, attention.num_heads, attention.head_dim)
        return projected.permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def _heads(attention: nn.MultiheadAttention, x: torch.Tensor, part: int) -> torch.Tensor:
        """Query (part 0), key (1) or value (2) projection of x (B, L, D) as (B, heads, L, D/heads)."""
        width = attention.embed_dim
        rows = slice(part * width, (part + 1) * width)
        projected = linear(x, attention.in_proj_weight[rows], attention.in_proj_bias[rows])
        return projected.view(x.size(0), x.size(1), attention.num_heads, attention.head_dim).transpose(1, 2)

    @staticmethod
    def _attend(
        attention: nn.MultiheadAttention,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled dot-product attention with the module's output projection; returns the
        output (B, Lq, D) and the weights (B, heads, Lq, Lk). `dropout` on the weights as
        nn.MultiheadAttention applies it in training (the returned weights are before it)."""
        weights = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(attention.head_dim), dim=-1)
        dropped = F.dropout(weights, dropout) if dropout else weights
        mixed = (dropped @ values).transpose(1, 2).reshape(query.size(0), query.size(2), attention.embed_dim)
        return attention.out_proj(mixed), weights
