"""Show, Attend and Tell (Xu et al., 2015) with soft (additive) attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioning.models.base import CaptionModel, State, additive_scores
from captioning.vocab import EOS, PAD


class SoftAttention(CaptionModel):
    """An LSTM that attends over the N spatial features at every word.

    Per step: alpha = softmax(w . tanh(W_f f + W_h h)), context = beta * sum(alpha f) with a
    scalar gate beta = sigmoid(W_b h); the LSTM reads [embedding; context]; the deep output
    scores E y + L_h h + L_z context. `forward` returns the doubly stochastic regulariser
    mean((1 - sum_t alpha_t)^2) as the auxiliary loss (unscaled).
    """

    name = "attention"
    static_keys = ("features", "feature_att")
    shared_static = True

    def __init__(self, config: dict[str, Any], vocab_size: int, feature_dim: int):
        super().__init__(config, vocab_size, feature_dim)
        embed, hidden, att = config["embed_dim"], config["hidden_dim"], config["attention_dim"]
        self.feature_att = nn.Linear(feature_dim, att)
        self.hidden_att = nn.Linear(hidden, att)
        self.score_att = nn.Linear(att, 1)
        self.gate = nn.Linear(hidden, 1)
        self.init_h = nn.Linear(feature_dim, hidden)
        self.init_c = nn.Linear(feature_dim, hidden)
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=PAD)
        self.lstm = nn.LSTMCell(embed + feature_dim, hidden)
        self.out_hidden = nn.Linear(hidden, embed)
        self.out_context = nn.Linear(feature_dim, embed)
        self.dropout = nn.Dropout(config["dropout"])
        self.output = nn.Linear(embed, vocab_size)

    def init_state(self, features: torch.Tensor) -> State:
        features = self.prepare(features)
        pooled = features.mean(dim=1)
        return {
            "h": torch.tanh(self.init_h(pooled)),
            "c": torch.tanh(self.init_c(pooled)),
            "features": features,
            # The feature half of the attention score is the same at every step: compute it once.
            "feature_att": self.feature_att(features),
        }

    def _advance(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        h, c = state["h"], state["c"]
        features = state["features"]
        # k rows of h per image row of the features (k > 1: beams sharing their image's features).
        images, k = features.size(0), h.size(0) // features.size(0)
        hidden = self.hidden_att(h).view(images, k, 1, -1)
        scores = additive_scores(state["feature_att"], hidden, self.score_att)  # (images, k, N)
        alpha = F.softmax(scores, dim=-1)
        context = torch.bmm(alpha, features).view(h.size(0), -1)
        alpha = alpha.view(h.size(0), -1)
        context = torch.sigmoid(self.gate(h)) * context
        embedded = self.embedding(tokens)
        h, c = self.lstm(torch.cat([self.dropout(embedded), context], dim=-1), (h, c))
        deep = embedded + self.out_hidden(h) + self.out_context(context)
        logits = self.output(self.dropout(deep))
        return logits, {**state, "h": h, "c": c}, alpha

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.start(features, tokens.size(0))
        logits, alphas = [], []
        for t in range(tokens.size(1)):
            step_logits, state, alpha = self._advance(tokens[:, t], state)
            logits.append(step_logits)
            alphas.append(alpha)
        alphas = torch.stack(alphas, dim=1)  # (B, T, N)
        # Only steps that read a caption word (BOS included) count: not EOS or padding.
        valid = ((tokens != PAD) & (tokens != EOS)).to(alphas.dtype)[..., None]
        coverage = (alphas * valid).sum(dim=1)  # (B, N)
        aux_loss = ((1.0 - coverage) ** 2).mean()
        return torch.stack(logits, dim=1), aux_loss

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        logits, state, alpha = self._advance(prev_tokens, state)
        return F.log_softmax(logits, dim=-1), state, alpha
