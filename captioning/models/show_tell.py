"""Show and Tell (Vinyals et al., 2015): the image vector starts an LSTM language model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioning.models.base import CaptionModel, State
from captioning.vocab import PAD


class ShowTell(CaptionModel):
    """Mean-pooled image features set the LSTM's initial state; no attention."""

    name = "show_tell"

    def __init__(self, config: dict[str, Any], vocab_size: int, feature_dim: int):
        super().__init__(config, vocab_size, feature_dim)
        embed, hidden = config["embed_dim"], config["hidden_dim"]
        self.init_h = nn.Linear(feature_dim, hidden)
        self.init_c = nn.Linear(feature_dim, hidden)
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=PAD)
        self.lstm = nn.LSTMCell(embed, hidden)
        self.dropout = nn.Dropout(config["dropout"])
        self.output = nn.Linear(hidden, vocab_size)

    def init_state(self, features: torch.Tensor) -> State:
        pooled = self.prepare(features).mean(dim=1)
        return {"h": torch.tanh(self.init_h(pooled)), "c": torch.tanh(self.init_c(pooled))}

    def _advance(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h, c = self.lstm(self.dropout(self.embedding(tokens)), (state["h"], state["c"]))
        return self.output(self.dropout(h)), {"h": h, "c": c}

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.start(features, tokens.size(0))
        logits = []
        for t in range(tokens.size(1)):
            step_logits, state = self._advance(tokens[:, t], state)
            logits.append(step_logits)
        return torch.stack(logits, dim=1), state["h"].new_zeros(())

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, None]:
        logits, state = self._advance(prev_tokens, state)
        return F.log_softmax(logits, dim=-1), state, None
