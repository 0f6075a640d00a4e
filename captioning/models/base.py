"""The interface every caption decoder implements, so training and decoding treat them alike.

Teacher forcing goes through `forward`; generation goes through `init_state` + `step`, one
token at a time, with a state that is a flat dict of batch-first tensors. Beam search can
therefore expand and reorder any model's state with `index_select(0, ...)`.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

State = dict[str, torch.Tensor]


def rows_per_image(rows: int, images: int) -> int:
    """k, when `rows` caption rows are k adjacent rows for each of `images` images."""
    if images == 0 or rows % images:
        raise ValueError(f"{rows} caption rows cannot be split evenly among {images} images")
    return rows // images


# Additive attention's sums (k beams x N positions x attention width) per image group: about
# 4 MB of float32, so each group's sums stay in the CPU cache between the add, the tanh and the score.
ATTENTION_GROUP_ELEMENTS = 1 << 20


def additive_scores(
    feature_att: torch.Tensor, hidden: torch.Tensor, score: nn.Module, group_elements: int = ATTENTION_GROUP_ELEMENTS
) -> torch.Tensor:
    """Additive attention scores score(tanh(feature_att + hidden)), (images, k, N), from the
    features' part (images, N, A) and k rows of the hidden part per image (images, k, 1, A).

    Without autograd the images go in groups; with it, every group's sums would be kept for the
    backward pass anyway, so training computes them in one piece."""
    images, k, _, width = hidden.shape
    group = max(1, group_elements // (k * feature_att.size(1) * width))
    if torch.is_grad_enabled() or group >= images:
        return score((feature_att[:, None] + hidden).tanh_()).squeeze(-1)
    return torch.cat(
        [
            score((feature_att[i : i + group, None] + hidden[i : i + group]).tanh_()).squeeze(-1)
            for i in range(0, images, group)
        ]
    )


class CaptionModel(nn.Module, abc.ABC):
    """A decoder from image features (B, N, C) to words.

    `config` holds the settings `build_model(config, vocab_size, feature_dim)` needs to
    rebuild the same architecture; every model ends in `self.output`, the linear layer
    that scores the vocabulary.
    """

    name: str = ""
    # State entries that never change while decoding and are equal for all beams of one
    # image: beam search may skip reordering them.
    static_keys: tuple[str, ...] = ()
    # True: `step` also accepts static entries with one row per image while the other entries
    # hold `k` adjacent rows per image (its beams), so beam search need not repeat them k times.
    shared_static: bool = False

    def __init__(self, config: dict[str, Any], vocab_size: int, feature_dim: int):
        super().__init__()
        self.config = dict(config)
        self.vocab_size = int(vocab_size)
        self.feature_dim = int(feature_dim)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Check the feature shape and cast the (float16 cached) features to the model's dtype."""
        if features.dim() != 3:
            raise ValueError(f"features must be (batch, positions, channels), got shape {tuple(features.shape)}")
        if features.size(-1) != self.feature_dim:
            raise ValueError(f"features have {features.size(-1)} channels, the model expects {self.feature_dim}")
        weight = self.reference_weight()
        return features.to(device=weight.device, dtype=weight.dtype)

    def reference_weight(self) -> torch.Tensor:
        """A floating-point weight of the model: its device and dtype are the model's (an int8
        model's quantized layers hold no such parameters, its embedding still does)."""
        return next(p for p in self.parameters() if p.is_floating_point())

    def start(self, features: torch.Tensor, rows: int) -> State:
        """`init_state` for `rows` caption rows, k = rows / images adjacent rows per image (the
        captions or beams of one image). Static entries stay one row per image when the model
        can share them (`shared_static`); every other entry is repeated k times."""
        if rows == features.size(0):
            return self.init_state(features)
        k = rows_per_image(rows, features.size(0))
        shared = self.static_keys if self.shared_static else ()
        return {
            key: value if key in shared else value.repeat_interleave(k, dim=0)
            for key, value in self.init_state(features).items()
        }

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: `tokens` (B, T) start with BOS; returns logits (B, T, V) where
        position t scores the token after tokens[:, t], and an auxiliary loss (scalar).

        `features` hold B rows, or one row per k adjacent token rows (B / k images, each with k
        captions): the image-side work is then done once per image, with the same result as
        repeating each image's features k times."""

    @abc.abstractmethod
    def init_state(self, features: torch.Tensor) -> State:
        """Decoding state before the first word: a dict of batch-first tensors."""

    @abc.abstractmethod
    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """One decoding step: previous tokens (B,) -> log-probabilities (B, V) of the next
        token, the new state, and attention weights over the N positions (B, N) or None."""
