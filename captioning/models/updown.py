"""The top-down attention decoder of Bottom-Up and Top-Down Attention (Anderson et al., 2018),
over the encoder's grid features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioning.models.base import CaptionModel, State, additive_scores
from captioning.vocab import PAD


class UpDown(CaptionModel):
    """Two LSTMs per word: an attention LSTM, then a language LSTM.

    The features are first projected to `hidden_dim` (linear, ReLU, dropout). Per step the
    attention LSTM reads [h_language; mean feature; embedding]; its state scores the positions,
    alpha = softmax(w . tanh(W_f f + W_h h_attention)); the language LSTM reads
    [sum(alpha f); h_attention] and its state scores the vocabulary. No auxiliary loss.
    """

    name = "updown"
    static_keys = ("features", "feature_att", "pooled")
    shared_static = True

    def __init__(self, config: dict[str, Any], vocab_size: int, feature_dim: int):
        super().__init__(config, vocab_size, feature_dim)
        embed, hidden, att = config["embed_dim"], config["hidden_dim"], config["attention_dim"]
        self.project = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(config["dropout"]))
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=PAD)
        self.attention_lstm = nn.LSTMCell(2 * hidden + embed, hidden)
        self.language_lstm = nn.LSTMCell(2 * hidden, hidden)
        self.feature_att = nn.Linear(hidden, att)
        self.hidden_att = nn.Linear(hidden, att)
        self.score_att = nn.Linear(att, 1)
        self.dropout = nn.Dropout(config["dropout"])
        self.output = nn.Linear(hidden, vocab_size)

    def init_state(self, features: torch.Tensor) -> State:
        features = self.project(self.prepare(features))
        zeros = features.new_zeros(features.size(0), self.config["hidden_dim"])
        return {
            "h1": zeros,
            "c1": zeros,
            "h2": zeros,
            "c2": zeros,
            "features": features,
            "feature_att": self.feature_att(features),  # the same at every step: computed once
            "pooled": features.mean(dim=1),
        }

    def _advance(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        features, h2 = state["features"], state["h2"]
        # k rows of the LSTM states per image row of the features (k > 1: beams sharing their image).
        images, k = features.size(0), h2.size(0) // features.size(0)
        pooled = state["pooled"].repeat_interleave(k, dim=0) if k > 1 else state["pooled"]
        embedded = self.embedding(tokens)
        h1, c1 = self.attention_lstm(torch.cat([h2, pooled, embedded], dim=-1), (state["h1"], state["c1"]))
        hidden = self.hidden_att(h1).view(images, k, 1, -1)
        scores = additive_scores(state["feature_att"], hidden, self.score_att)  # (images, k, N)
        alpha = F.softmax(scores, dim=-1)
        context = torch.bmm(alpha, features).view(h1.size(0), -1)
        h2, c2 = self.language_lstm(torch.cat([context, h1], dim=-1), (h2, state["c2"]))
        logits = self.output(self.dropout(h2))
        return logits, {**state, "h1": h1, "c1": c1, "h2": h2, "c2": c2}, alpha.view(h1.size(0), -1)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.start(features, tokens.size(0))
        logits = []
        for t in range(tokens.size(1)):
            step_logits, state, _ = self._advance(tokens[:, t], state)
            logits.append(step_logits)
        return torch.stack(logits, dim=1), logits[0].new_zeros(())

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        logits, state, alpha = self._advance(prev_tokens, state)
        return F.log_softmax(logits, dim=-1), state, alpha
