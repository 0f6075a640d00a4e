"""Self-critical sequence training (Rennie et al., 2017): optimise CIDEr-D itself after cross-entropy.

For each image the model samples `samples` captions; each caption's reward is its CIDEr-D
against the image's training references, and its baseline is the mean reward of the other
captions sampled for the same image (Luo, 2020: no extra greedy pass, a lower-variance
baseline). The loss is REINFORCE: -(reward - baseline) * log p(caption).

Words may be drawn among each step's k most likely only (the policy is then the model's
distribution renormalised over them): a label-smoothed model keeps about a tenth of its
probability spread over the whole vocabulary, and drawing from all of it puts a stray word
into most samples, so their rewards say little about the words the model would choose.

The reward is `captioning.inference.cider.CiderD` over the training references, with document
frequencies of the whole training corpus; it counts the end of the caption as a word
(EOS closes both the sample and the references).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from captioning.inference.cider import CiderD
from captioning.inference.decoding import mask_log_probs
from captioning.vocab import BOS, EOS, PAD


def references_from_pairs(rows: np.ndarray, tokens: torch.Tensor, images: int) -> list[list[list[int]]]:
    """Per image, its training captions as token ids: pair i (tokens[i], BOS ... EOS PAD...) is of image rows[i]."""
    references: list[list[list[int]]] = [[] for _ in range(images)]
    for image, row in zip(rows.tolist(), tokens.tolist()):
        references[image].append(strip(row))
    return references


def strip(ids: Sequence[int]) -> list[int]:
    """The words and the EOS that ends them, if any: BOS and PAD dropped, nothing after EOS."""
    words = []
    for token in ids:
        if token not in (BOS, PAD):
            words.append(int(token))
        if token == EOS:
            break
    return words


def sample(
    model, features: torch.Tensor, max_length: int, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One caption sampled per row of `features`, with gradients.

    Returns tokens (B, T) (EOS included when produced, PAD after), their log-probabilities (B, T)
    and a mask (B, T) of the positions that count (words and the EOS). The same tokens are
    banned as in decoding (PAD, BOS, UNK; EOS first).
    """
    state = model.init_state(features)
    batch = features.size(0)
    prev = torch.full((batch,), BOS, dtype=torch.long, device=features.device)
    alive = torch.ones(batch, dtype=torch.bool, device=features.device)
    tokens, log_probs, masks = [], [], []
    for step in range(max_length + 1):
        step_log_probs, state, _ = model.step(prev, state)
        if step == max_length:
            # A caption may be max_length words long: the last step may only end it.
            allowed = torch.full_like(step_log_probs, float("-inf"), dtype=torch.float32)
            allowed[:, EOS] = 0.0
            step_log_probs = step_log_probs.float() + allowed
        else:
            step_log_probs = mask_log_probs(step_log_probs, step)
            if top_k > 0:
                step_log_probs = keep_top_k(step_log_probs, top_k)
        step_log_probs = torch.log_softmax(step_log_probs, dim=-1)  # renormalised over what may be drawn
        drawn = torch.multinomial(step_log_probs.detach().exp(), 1).squeeze(1)
        drawn = torch.where(alive, drawn, torch.full_like(drawn, PAD))
        tokens.append(drawn)
        picked = step_log_probs.gather(1, drawn[:, None]).squeeze(1)
        # Finished rows "draw" PAD, whose log-probability is -inf: keep it out of the sum.
        log_probs.append(torch.where(alive, picked, torch.zeros_like(picked)))
        masks.append(alive.clone())
        alive = alive & (drawn != EOS)
        prev = drawn
        if not alive.any():
            break
    mask = torch.stack(masks, dim=1)
    return torch.stack(tokens, dim=1), torch.stack(log_probs, dim=1), mask


def keep_top_k(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """`log_probs` with every word less likely than each row's k-th set to -inf (ties with it are kept)."""
    log_probs = log_probs.float()
    threshold = log_probs.topk(min(k, log_probs.size(-1)), dim=-1).values[:, -1:]
    return log_probs.masked_fill(log_probs < threshold, float("-inf"))


def scst_loss(
    model, features: torch.Tensor, images: Sequence[int], cider: CiderD, samples: int, max_length: int, top_k: int = 0
) -> tuple[torch.Tensor, float]:
    """The self-critical loss for a batch of images (features (B, N, C)); returns it and the mean reward."""
    if samples < 2:
        raise ValueError(f"self-critical training needs at least 2 samples per image (the baseline), not {samples}")
    expanded = features.repeat_interleave(samples, dim=0)
    tokens, log_probs, mask = sample(model, expanded, max_length, top_k)
    rewards = torch.tensor(
        [cider.score(images[k // samples], strip(row)) for k, row in enumerate(tokens.tolist())],
        dtype=torch.float32,
        device=features.device,
    ).view(-1, samples)
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (samples - 1)
    advantage = (rewards - baseline).view(-1, 1)
    loss = -(advantage * log_probs).sum() / mask.sum().clamp(min=1)
    return loss, float(rewards.mean())
