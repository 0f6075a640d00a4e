"""Beam search written the plain way: one image, one hypothesis, one model step at a time.

It follows the rules of `captioning.inference.decoding` without batching or early stopping, so the
tests use it as the oracle for the batched `beam_search`, and the decoding benchmark
measures how much faster the batched version is.
"""

from __future__ import annotations

import numpy as np
import torch

from captioning.inference.decoding import Hypothesis, as_features, inference, length_score, mask_log_probs
from captioning.models.base import CaptionModel
from captioning.vocab import BOS, EOS


def reference_beam_search(
    model: CaptionModel,
    features: torch.Tensor | np.ndarray,
    beam_size: int,
    max_length: int,
    length_penalty: float = 0.0,
) -> list[list[Hypothesis]]:
    with inference(model):
        features = as_features(model, features)
        return [
            _one_image(model, features[i : i + 1], beam_size, max_length, length_penalty)
            for i in range(features.size(0))
        ]


def _one_image(model, features, beam_size, max_length, length_penalty) -> list[Hypothesis]:
    # A beam: (tokens, log_prob, state, attention rows)
    beams = [([], 0.0, model.init_state(features), [])]
    ended: list[Hypothesis] = []
    for t in range(max_length):
        candidates = []  # (log_prob, tokens, state, attention rows, is_eos)
        for tokens, log_prob, state, rows in beams:
            prev = torch.tensor([tokens[-1] if tokens else BOS], device=features.device)
            log_probs, new_state, weights = model.step(prev, state)
            log_probs = mask_log_probs(log_probs, t)[0]
            new_rows = rows + ([weights[0].float().cpu().numpy()] if weights is not None else [])
            # Its best beam_size + 1 words hold every candidate this beam can contribute.
            values, words = log_probs.topk(beam_size + 1)
            for value, word in zip(values.tolist(), words.tolist()):
                if word == EOS:
                    candidates.append((log_prob + value, tokens, state, rows, True))
                else:
                    candidates.append((log_prob + value, tokens + [word], new_state, new_rows, False))
        candidates.sort(key=lambda c: -c[0])
        for log_prob, tokens, _, rows, is_eos in candidates[:beam_size]:
            if is_eos:
                score = length_score(log_prob, t + 1, length_penalty)
                ended.append(Hypothesis(list(tokens), log_prob, score, _stack(rows), True))
        beams = [(c[1], c[0], c[2], c[3]) for c in candidates if not c[4]][:beam_size]
    for tokens, log_prob, _, rows in beams:
        score = length_score(log_prob, max_length, length_penalty)
        ended.append(Hypothesis(list(tokens), log_prob, score, _stack(rows), False))
    ended.sort(key=lambda h: -h.score)
    return ended[:beam_size]


def _stack(rows: list[np.ndarray]) -> np.ndarray | None:
    return np.stack(rows) if rows else None
