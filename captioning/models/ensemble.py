"""Several trained decoders that caption as one: their word probabilities are averaged.

The members read the same image features and share one vocabulary. At every step each
member advances its own state (kept in the ensemble's state under the member's index,
e.g. "1.h"), and the ensemble's log-probability of a word is log(mean_i p_i(word)), so
greedy and beam search work on it unchanged. Attention weights are the mean of the
members' that have them.

`with_flip` makes the same kind of average over two views of each image, the image and
its left-right mirror: features then hold both views' positions side by side (B, 2N, C),
and each member reads each half (`View`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from captioning.models.base import CaptionModel, State


class Ensemble(CaptionModel):
    name = "ensemble"

    def __init__(self, config: dict[str, Any], vocab_size: int, feature_dim: int, members: list[CaptionModel]):
        super().__init__(config, vocab_size, feature_dim)
        self.members = nn.ModuleList(members)
        self.static_keys = tuple(f"{i}.{key}" for i, member in enumerate(members) for key in member.static_keys)
        self.shared_static = all(member.shared_static for member in members)

    @property
    def output(self) -> nn.Linear:  # type: ignore[override]
        """The first member's vocabulary layer (device and dtype of the ensemble)."""
        return self.members[0].output

    def _average(self, log_probs: list[torch.Tensor]) -> torch.Tensor:
        """log(mean_i exp(log_probs[i])), folded pairwise (no stacked copy of the members' outputs)."""
        return functools.reduce(torch.logaddexp, log_probs).sub_(math.log(len(log_probs)))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log of the members' mean word probabilities (valid logits: their softmax is that mean)."""
        outputs = [member(features, tokens) for member in self.members]
        log_probs = [torch.log_softmax(logits.float(), dim=-1) for logits, _ in outputs]
        aux = torch.stack([aux.float() for _, aux in outputs]).mean()
        return self._average(log_probs), aux

    def init_state(self, features: torch.Tensor) -> State:
        return {
            f"{i}.{key}": value
            for i, member in enumerate(self.members)
            for key, value in member.init_state(features).items()
        }

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        log_probs, weights, new_state = [], [], {}
        for i, member in enumerate(self.members):
            prefix = f"{i}."
            own = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
            member_log_probs, own, member_weights = member.step(prev_tokens, own)
            log_probs.append(member_log_probs.float())
            new_state.update({prefix + key: value for key, value in own.items()})
            if member_weights is not None:
                weights.append(member_weights.float())
        attention = torch.stack(weights).mean(dim=0) if weights else None
        return self._average(log_probs), new_state, attention


class View(CaptionModel):
    """A member reading one view of the image: its part of the positions (B, views * N, C).

    A mirrored view maps its attention weights back onto the image's own grid, so attention
    averaged over views stays where it was on the image.
    """

    name = "view"

    def __init__(self, member: CaptionModel, view: int, views: int, mirrored: bool = False):
        super().__init__(member.config, member.vocab_size, member.feature_dim)
        self.member, self.view, self.views, self.mirrored = member, view, views, mirrored
        self.static_keys, self.shared_static = member.static_keys, member.shared_static

    @property
    def output(self) -> nn.Linear:  # type: ignore[override]
        return self.member.output

    def _part(self, features: torch.Tensor) -> torch.Tensor:
        if features.size(1) % self.views:
            raise ValueError(
                f"features of {self.views} views need a multiple of {self.views} positions, got {features.size(1)}"
            )
        size = features.size(1) // self.views
        return features[:, self.view * size : (self.view + 1) * size]

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.member(self._part(features), tokens)

    def init_state(self, features: torch.Tensor) -> State:
        return self.member.init_state(self._part(features))

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        log_probs, state, weights = self.member.step(prev_tokens, state)
        if weights is not None and self.mirrored:
            side = math.isqrt(weights.size(-1))
            if side * side == weights.size(-1):  # a square grid: column c of the mirror is W-1-c of the image
                weights = weights.reshape(*weights.shape[:-1], side, side).flip(-1).reshape(weights.shape)
        return log_probs, state, weights


def with_flip(model: CaptionModel) -> Ensemble:
    """`model` (one decoder or an ensemble) reading features of the image and of its mirror,
    side by side (B, 2N, C): every member's word probabilities averaged over both views."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    views = [View(member, view, 2, mirrored=view == 1) for view in (0, 1) for member in members]
    return Ensemble(dict(model.config), model.vocab_size, model.feature_dim, views).eval()
