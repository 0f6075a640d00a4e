"""Caption generation for any `CaptionModel`: greedy and batched beam search.

Both advance the whole batch in tensor operations through `model.init_state` / `model.step`.
Rules shared by both (and by the reference implementation in `harness/reference.py`):
- PAD, BOS and UNK are never generated; EOS is not allowed as the first token (no empty captions).
- A caption has at most `max_length` words; one that never produced EOS is returned as it
  stands at `max_length` (`finished=False`), never an error.
- `tokens` exclude BOS and EOS; `log_prob` sums the log-probabilities of the tokens and of
  EOS when produced; `score = log_prob / length ** length_penalty`, where `length` counts EOS.
- Beam search keeps `beam_size` live beams per image. At each step the best `beam_size`
  candidates (all words of all beams) are ranked: an EOS among them moves that hypothesis
  to the image's finished pool; the live beams are the best `beam_size` non-EOS candidates.
  With `beam_size=1` this is exactly greedy decoding.

`generate` is the one place that picks between them from a `DecodingSettings`.

`rerank_by_consensus` reorders a beam's hypotheses by how much each agrees with the others
(minimum Bayes risk under CIDEr-D): the caption the beam as a whole supports, rather than
the single most probable one; `decoding.rerank_score_weight` adds back a share of each
caption's own beam score.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from captioning.inference.cider import NgramFrequencies, consensus
from captioning.models.base import CaptionModel, State
from captioning.settings import EARLY_STOPS, DecodingSettings
from captioning.vocab import BOS, EOS, PAD, UNK

BANNED = (PAD, BOS, UNK)


@dataclass
class Hypothesis:
    tokens: list[int]
    log_prob: float
    score: float
    attention: np.ndarray | None = None  # (len(tokens), N): the weights each word was generated with
    finished: bool = True  # False: cut at max_length without an EOS


def length_score(log_prob: float, length: int, length_penalty: float) -> float:
    """Length-normalised score; `length_penalty=0` keeps the raw log-probability."""
    return log_prob / (length**length_penalty)


@contextmanager
def inference(model: CaptionModel) -> Iterator[None]:
    """Eval mode and no autograd while decoding; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def as_features(model: CaptionModel, features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Features (B, N, C) as a tensor on the model's device (dtype is the model's business)."""
    tensor = torch.as_tensor(features)
    if tensor.dim() != 3:
        raise ValueError(f"features must be (batch, positions, channels), got shape {tuple(tensor.shape)}")
    return tensor.to(model.reference_weight().device)


def mask_log_probs(log_probs: torch.Tensor, step: int) -> torch.Tensor:
    """Float32 log-probabilities with the tokens that may not be generated at `step` set to -inf."""
    banned = list(BANNED) + ([EOS] if step == 0 else [])
    index = torch.tensor(banned, device=log_probs.device)
    return log_probs.float().index_fill(1, index, float("-inf"))


def _check(beam_size: int, max_length: int, vocab_size: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    words = vocab_size - len(BANNED) - 1
    if beam_size > words:
        raise ValueError(f"beam_size {beam_size} exceeds the {words} generable words of the vocabulary")


def _rows(array: torch.Tensor | None, index: torch.Tensor, length: torch.Tensor) -> list:
    """Per-row numpy slices array[i, :length[i]] (or Nones)."""
    if array is None:
        return [None] * len(index)
    picked = array.index_select(0, index).float().cpu().numpy()
    return [picked[i, : int(n)] for i, n in enumerate(length.tolist())]


def greedy(
    model: CaptionModel, features: torch.Tensor | np.ndarray, max_length: int, with_attention: bool = True
) -> list[list[Hypothesis]]:
    """The most likely word at every step, for the whole batch at once; one hypothesis per image
    (its attention maps only `with_attention`)."""
    _check(1, max_length, model.vocab_size)
    with inference(model):
        features = as_features(model, features)
        batch = features.size(0)
        device = features.device
        state = model.init_state(features)
        prev = torch.full((batch,), BOS, dtype=torch.long, device=device)
        tokens = torch.zeros(batch, max_length, dtype=torch.long, device=device)
        log_prob = torch.zeros(batch, device=device)
        length = torch.full((batch,), max_length, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        attention = None
        for t in range(max_length):
            log_probs, state, weights = model.step(prev, state)
            best_log_prob, best = mask_log_probs(log_probs, t).max(dim=-1)
            if weights is not None and with_attention:
                if attention is None:
                    attention = features.new_zeros(batch, max_length, weights.size(-1), dtype=torch.float32)
                attention[:, t] = weights.float()
            log_prob += torch.where(done, torch.zeros_like(best_log_prob), best_log_prob)
            ends = ~done & (best == EOS)
            length[ends] = t
            done |= ends
            tokens[:, t] = best
            prev = best
            if bool(done.all()):
                break
        rows = torch.arange(batch, device=device)
        maps = _rows(attention, rows, length)
        results = []
        for i, (n, lp, fin) in enumerate(zip(length.tolist(), log_prob.tolist(), done.tolist())):
            results.append([Hypothesis(tokens[i, :n].tolist(), lp, lp, maps[i], fin)])
        return results


class _Pool:
    """Each image's best `size` ended hypotheses, best first."""

    def __init__(self, batch: int, size: int):
        self.size = size
        self.entries: list[list[Hypothesis]] = [[] for _ in range(batch)]

    def add(self, image: int, hypothesis: Hypothesis) -> None:
        entries = self.entries[image]
        entries.append(hypothesis)
        entries.sort(key=lambda h: -h.score)
        del entries[self.size :]

    def worst(self, images: list[int], device: torch.device) -> torch.Tensor:
        """Per image in `images`, the score a new hypothesis must beat to enter its full pool
        (-inf while not full)."""
        values = [e[-1].score if len(e) == self.size else -math.inf for e in map(self.entries.__getitem__, images)]
        return torch.tensor(values, device=device)


def _reorder(state: State, index: torch.Tensor, static: tuple[str, ...]) -> State:
    return {key: value if key in static else value.index_select(0, index) for key, value in state.items()}


def beam_search(
    model: CaptionModel,
    features: torch.Tensor | np.ndarray,
    beam_size: int,
    max_length: int,
    length_penalty: float = 0.0,
    with_attention: bool = True,
    early_stop: str = "exact",
) -> list[list[Hypothesis]]:
    """Beam search over images x beams in tensor operations; per image, `beam_size`
    hypotheses best first, with their attention maps only `with_attention` (keeping them
    means reordering every beam's maps at every step). An image whose live beams can no longer
    enter its top list is settled (`early_stop`: see `_settled`); once a quarter of the images
    are, they leave the batch (the rest decode without them). The search stops when every
    image is settled."""
    _check(beam_size, max_length, model.vocab_size)
    if early_stop not in EARLY_STOPS:
        raise ValueError(f"early_stop must be one of {', '.join(EARLY_STOPS)}, got {early_stop!r}")
    with inference(model):
        features = as_features(model, features)
        batch, beams, vocab = features.size(0), beam_size, model.vocab_size
        device = features.device
        # Every beam of an image starts the same: one row per image until the first word.
        state = model.start(features, batch)
        shared = model.static_keys if model.shared_static else ()  # entries kept one row per image
        prev = torch.full((batch,), BOS, dtype=torch.long, device=device)
        beam_log_prob = torch.zeros(batch, 1, device=device)
        seqs = torch.zeros(batch, max_length, dtype=torch.long, device=device)
        attention = None
        images = list(range(batch))  # the image of each group of `beams` rows still decoding
        pool = _Pool(batch, beams)
        stopped_early = False
        for t in range(max_length):
            width = beam_log_prob.size(1)  # rows per image: 1 at the first step, then `beams`
            log_probs, state, weights = model.step(prev, state)
            if weights is not None and with_attention:
                if attention is None:
                    attention = torch.zeros(batch, max_length, weights.size(-1), device=device)
                attention[:, t] = weights.float()
            live = len(images)
            total = (beam_log_prob.view(-1, 1) + mask_log_probs(log_probs, t)).view(live, width * vocab)
            # Each row has one EOS candidate, so the best 2 * beams hold the best `beams` that
            # are not EOS: one ranking serves both the ended hypotheses and the live beams.
            ranked = min(2 * beams, width * vocab)
            values, top = total.topk(ranked, dim=1)
            ended = (top % vocab) == EOS
            _collect_ended(values, top, ended, t, beams, width, vocab, seqs, attention, pool, length_penalty, images)
            rank = torch.arange(ranked, device=device) + ended * ranked  # EOS ranked last
            pick = rank.topk(beams, dim=1, largest=False).indices.sort(dim=1).values
            beam_log_prob, top = values.gather(1, pick), top.gather(1, pick)
            source = (torch.arange(live, device=device)[:, None] * width + top // vocab).view(-1)
            prev = (top % vocab).view(-1)
            # After the first step static entries are in place (per beam, or shared per image).
            state = _reorder(state, source, model.static_keys if width == beams else shared)
            seqs = seqs.index_select(0, source)
            seqs[:, t] = prev
            if attention is not None:
                attention = attention.index_select(0, source)
            if t + 1 < max_length:
                settled = _settled(beam_log_prob, pool, images, t, max_length, length_penalty, early_stop)
                if bool(settled.all()):
                    stopped_early = True
                    break
                # Dropping copies the state (the repeated image features too): only once a
                # quarter of the images are settled. The others decode on, their results unused.
                if 4 * int(settled.sum()) >= len(images):
                    keep = (~settled).nonzero().squeeze(1)
                    rows = (keep[:, None] * beams + torch.arange(beams, device=device)).view(-1)
                    state = {
                        key: value.index_select(0, keep if key in shared else rows) for key, value in state.items()
                    }
                    prev, seqs = prev.index_select(0, rows), seqs.index_select(0, rows)
                    attention = None if attention is None else attention.index_select(0, rows)
                    beam_log_prob = beam_log_prob.index_select(0, keep)
                    images = [images[i] for i in keep.tolist()]
        if not stopped_early:
            _collect_live(beam_log_prob, seqs, attention, pool, max_length, length_penalty, images)
        return pool.entries


def _collect_ended(values, top, ended, t, beams, width, vocab, seqs, attention, pool, length_penalty, images) -> None:
    """Move the EOS candidates ranked among the top `beams` of their image into the pool
    (`values`, `top`: each image's ranked candidates and their flat indices over its `width`
    rows, row group g is image images[g]; `ended`: which are EOS)."""
    image, rank = ended[:, :beams].nonzero(as_tuple=True)
    if len(image) == 0:
        return
    flat = top[image, rank]
    source = image * width + flat // vocab
    log_probs = values[image, rank].tolist()
    lengths = torch.full_like(source, t)
    tokens = seqs.index_select(0, source)[:, :t].tolist()
    maps = _rows(attention, source, lengths)
    for i, b in enumerate(image.tolist()):
        score = length_score(log_probs[i], t + 1, length_penalty)
        pool.add(images[b], Hypothesis(tokens[i], log_probs[i], score, maps[i], True))


def _collect_live(beam_log_prob, seqs, attention, pool, max_length, length_penalty, images) -> None:
    """At max_length the live beams end without EOS and compete with the finished ones."""
    batch, beams = beam_log_prob.shape
    log_probs = beam_log_prob.view(-1).tolist()
    tokens = seqs.tolist()
    index = torch.arange(batch * beams, device=seqs.device)
    maps = _rows(attention, index, torch.full_like(index, max_length))
    for row in range(batch * beams):
        score = length_score(log_probs[row], max_length, length_penalty)
        pool.add(images[row // beams], Hypothesis(tokens[row], log_probs[row], score, maps[row], False))


def _settled(beam_log_prob, pool, images, t, max_length, length_penalty, early_stop="exact") -> torch.Tensor:
    """Per image still decoding, True when none of its live beams can still beat its full pool.

    "exact": log-probabilities only fall as words are added, and a live beam ends with a length
    in [t + 2, max_length], so its best possible score is its current log-probability over one
    of those two lengths' penalty (whichever is larger). With a length penalty that bound is
    loose: a beam would have to lose no probability over many more words. "heuristic" bounds a
    beam by its score if it ended at its next word (Hugging Face's `early_stopping=False`)."""
    best = beam_log_prob.max(dim=1).values
    bound = best / float(t + 2) ** length_penalty
    if early_stop == "exact":
        bound = torch.maximum(bound, best / float(max_length) ** length_penalty)
    return bound <= pool.worst(images, best.device)


def generate(
    model: CaptionModel,
    features: torch.Tensor | np.ndarray,
    decoding: DecodingSettings,
    with_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Per image, its hypotheses best first as `decoding` says: greedy decoding when its beam
    size is 1, else beam search with its length penalty and early stop. Reranking is the caller's."""
    if decoding.beam_size <= 1:
        return greedy(model, features, decoding.max_length, with_attention=with_attention)
    return beam_search(
        model,
        features,
        decoding.beam_size,
        decoding.max_length,
        decoding.length_penalty,
        with_attention=with_attention,
        early_stop=decoding.early_stop,
    )


def rerank_by_consensus(
    hypotheses: list[Hypothesis],
    frequencies: NgramFrequencies,
    evidence: list[list[int]] = (),
    weight: float = 0.0,
    score_weight: float = 0.0,
) -> list[Hypothesis]:
    """One image's hypotheses, highest mean CIDEr-D against the others first (ties keep beam order).

    Among a beam's captions, the one that shares the most weighted n-grams with the rest
    carries what most of them say; the most probable one is often a short, generic caption.
    The n-gram weights are the training captions' (`frequencies`); hypotheses are compared
    by their words. `evidence` (the captions of the image's nearest training images,
    `neighbours.CaptionMemory`) counts for `weight` of the agreement, the beam for the rest.
    `score_weight` times each hypothesis's beam score (length-normalised log-probability, at
    most 0) is added to its agreement: agreement alone drifts to long captions that repeat the
    beam's common phrases, and the model's own preference pulls back toward fluent, shorter ones.
    """
    agreement = consensus([h.tokens for h in hypotheses], frequencies, evidence, weight)
    if score_weight:
        agreement = [value + score_weight * h.score for value, h in zip(agreement, hypotheses)]
    order = sorted(range(len(hypotheses)), key=lambda i: -agreement[i])
    return [hypotheses[i] for i in order]
