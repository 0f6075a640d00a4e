"""Several trained decoders that caption as one: their word probabilities are averaged.

The members read the same image features and share one vocabulary. At every step each
member advances its own state (kept in the ensemble's state under the member's index,
e.g. "1.h"), and the ensemble's log-probability of a word is log(mean_i p_i(word)), so
greedy and beam search work on it unchanged. Attention weights are the mean of the
members' that have them.
"""

from __future__ import annotations

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
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log of the members' mean word probabilities (valid logits: their softmax is that mean)."""
        outputs = [member(features, tokens) for member in self.members]
        log_probs = [torch.log_softmax(logits.float(), dim=-1) for logits, _ in outputs]
        aux = torch.stack([aux.float() for _, aux in outputs]).mean()
        return self._average(log_probs), aux

    def init_state(self, features: torch.Tensor) -> State:
        return {f"{i}.{key}": value for i, member in enumerate(self.members)
                for key, value in member.init_state(features).items()}

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        log_probs, weights, new_state = [], [], {}
        for i, member in enumerate(self.members):
            prefix = f"{i}."
            own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            member_log_probs, own, member_weights = member.step(prev_tokens, own)
            log_probs.append(member_log_probs.float())
            new_state.update({prefix + key: value for key, value in own.items()})
            if member_weights is not None:
                weights.append(member_weights.float())
        attention = torch.stack(weights).mean(dim=0) if weights else None
        return self._average(log_probs), new_state, attention
