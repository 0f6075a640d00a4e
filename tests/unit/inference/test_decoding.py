"""Batched greedy and beam search against the plain per-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioning.inference.decoding import BANNED, beam_search, greedy
from captioning.models import MODELS, build_model
from captioning.models.base import CaptionModel
from captioning.vocab import BOS, EOS
from harness.reference import reference_beam_search

torch.set_num_threads(1)

DECODERS = sorted(MODELS)
TINY = {"embed_dim": 24, "hidden_dim": 32, "attention_dim": 16, "dropout": 0.2, "layers": 2, "heads": 2, "ff_dim": 48}
VOCAB, CHANNELS, POSITIONS, MAX_LENGTH = 30, 16, 6, 8


def random_model(decoder: str, seed: int = 0, eos_bias: float = 0.0):
    """Random weights with a sharpened output layer, so captions end at varied lengths."""
    torch.manual_seed(seed)
    model = build_model({"decoder": decoder, **TINY}, VOCAB, CHANNELS)
    with torch.no_grad():
        model.output.weight.mul_(6.0)
        # Some decoders start with flat scores (show_tell; updown, whose states start at
        # zero): sharpen those until their first step's log-probabilities spread by 2 or more.
        state = model.eval().init_state(features(4))
        logits = model.step(torch.full((4,), BOS), state)[0]
        model.output.weight.mul_(max(1.0, 2.0 / float(logits.std(dim=-1).mean())))
        model.output.bias[EOS] += eos_bias
    return model.train()


def features(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, POSITIONS, CHANNELS, generator=torch.Generator().manual_seed(seed))


def assert_same(batched, reference):
    assert len(batched) == len(reference)
    for mine, theirs in zip(batched, reference):
        assert [h.tokens for h in mine] == [h.tokens for h in theirs]
        assert [h.finished for h in mine] == [h.finished for h in theirs]
        for a, b in zip(mine, theirs):
            assert a.score == pytest.approx(b.score, abs=1e-4)
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)
            if b.attention is None:
                assert a.attention is None
            else:
                assert a.attention.shape == (len(a.tokens), POSITIONS)
                np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_search_matches_reference(decoder):
    """Several batch sizes, beam sizes, length penalties and EOS propensities."""
    lengths, finished = set(), set()
    for eos_bias, batch, beam, penalty in [
        (0.0, 1, 2, 0.0),
        (2.0, 3, 3, 0.0),
        (2.0, 5, 4, 0.7),
        (4.0, 4, 2, 1.0),
        (1.0, 2, 5, 0.0),
        (3.0, 6, 1, 0.0),
        (2.5, 12, 3, 0.5),  # images settle at different steps, some left in the batch, some dropped
    ]:
        model = random_model(decoder, seed=batch, eos_bias=eos_bias)
        feats = features(batch, seed=beam)
        batched = beam_search(model, feats, beam, MAX_LENGTH, penalty)
        assert_same(batched, reference_beam_search(model, feats, beam, MAX_LENGTH, penalty))
        for hypotheses in batched:
            assert len(hypotheses) == beam
            scores = [h.score for h in hypotheses]
            assert scores == sorted(scores, reverse=True)
            assert len({tuple(h.tokens) for h in hypotheses}) == beam
            assert all(1 <= len(h.tokens) <= MAX_LENGTH for h in hypotheses)
            assert not any(t in BANNED or t == EOS for h in hypotheses for t in h.tokens)
            lengths.update(len(h.tokens) for h in hypotheses)
            finished.update(h.finished for h in hypotheses)
    # The cases exercise both ended and cut-off hypotheses of several lengths.
    assert finished == {True, False} and len(lengths) >= 3


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_one_equals_greedy(decoder):
    for batch, eos_bias in [(1, 0.0), (4, 2.0), (7, 3.0)]:
        model = random_model(decoder, seed=batch, eos_bias=eos_bias)
        feats = features(batch)
        assert_same(beam_search(model, feats, 1, MAX_LENGTH), greedy(model, feats, MAX_LENGTH))


@pytest.mark.parametrize("decoder", DECODERS)
def test_no_end_token_returns_max_length(decoder):
    model = random_model(decoder, eos_bias=-1e4)  # EOS never wins
    feats = features(3)
    for results in (greedy(model, feats, MAX_LENGTH), beam_search(model, feats, 3, MAX_LENGTH, 0.5)):
        for hypotheses in results:
            assert all(len(h.tokens) == MAX_LENGTH and not h.finished for h in hypotheses)
            assert all(np.isfinite(h.score) for h in hypotheses)
    assert_same(beam_search(model, feats, 3, MAX_LENGTH), reference_beam_search(model, feats, 3, MAX_LENGTH))


@pytest.mark.parametrize("decoder", DECODERS)
def test_attention_maps_only_when_asked(decoder):
    """Without maps the search is the same (tokens, scores, order); it only skips keeping them."""
    model = random_model(decoder, seed=3, eos_bias=2.0)
    feats = features(5)
    for search in (
        lambda **kw: beam_search(model, feats, 3, MAX_LENGTH, 0.7, **kw),
        lambda **kw: greedy(model, feats, MAX_LENGTH, **kw),
    ):
        with_maps, without = search(), search(with_attention=False)
        assert [[(h.tokens, h.score, h.finished) for h in row] for row in with_maps] == [
            [(h.tokens, h.score, h.finished) for h in row] for row in without
        ]
        assert all(h.attention is None for row in without for h in row)


def test_decoding_keeps_model_mode_and_takes_float16_numpy():
    model = random_model("attention", eos_bias=2.0)
    model.train()
    feats = features(2).numpy().astype(np.float16)
    first = beam_search(model, feats, 2, MAX_LENGTH)
    assert model.training
    # Dropout is off while decoding, so repeated calls agree.
    assert [h.tokens for h in first[0]] == [h.tokens for h in beam_search(model, feats, 2, MAX_LENGTH)[0]]
    assert len(greedy(model, feats, MAX_LENGTH)) == 2


def test_bad_arguments_are_refused():
    model = random_model("show_tell")
    feats = features(2)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, feats, 0, MAX_LENGTH)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, feats, VOCAB, MAX_LENGTH)
    with pytest.raises(ValueError, match="max_length"):
        greedy(model, feats, 0)
    with pytest.raises(ValueError, match="batch, positions, channels"):
        beam_search(model, feats[0], 2, MAX_LENGTH)


class ScriptedModel(CaptionModel):
    """A decoder from random tables: the next-word distribution depends on the previous word,
    the position and the image.

    Peaked tables make long confident continuations common, which is where length
    normalisation and the early stop of beam search matter. The position term keeps
    reordered word sequences from tying exactly."""

    name = "scripted"

    def __init__(self, vocab_size: int, seed: int, scale: float = 3.0, eos_bias: float = 1.0):
        super().__init__({"decoder": "scripted"}, vocab_size, vocab_size)
        generator = torch.Generator().manual_seed(seed)
        table = torch.randn(vocab_size, vocab_size, generator=generator) * scale
        table[:, EOS] += eos_bias
        self.register_buffer("table", table)
        self.register_buffer("position", torch.randn(MAX_LENGTH + 1, vocab_size, generator=generator))
        self.output = torch.nn.Linear(1, vocab_size)  # only tells decoding the device

    def init_state(self, features):
        image = self.prepare(features).mean(dim=1)
        return {"image": image, "step": torch.zeros(len(image), dtype=torch.long)}

    def step(self, prev_tokens, state):
        logits = self.table[prev_tokens] + self.position[state["step"]] + state["image"]
        return torch.log_softmax(logits, dim=-1), {**state, "step": state["step"] + 1}, None

    def forward(self, features, tokens):
        image = self.prepare(features).mean(dim=1)
        steps = torch.arange(tokens.size(1))
        return self.table[tokens] + self.position[steps] + image[:, None], image.new_zeros(())


def test_beam_search_matches_reference_on_scripted_models():
    for seed in range(40):
        model = ScriptedModel(12, seed, eos_bias=1.0 + 2.0 * (seed % 2 == 0))
        feats = torch.randn(4, 2, 12, generator=torch.Generator().manual_seed(seed))
        for penalty in (0.0, 1.0, 2.0, -0.5):
            beam = 2 + seed % 3
            assert_same(
                beam_search(model, feats, beam, MAX_LENGTH, penalty),
                reference_beam_search(model, feats, beam, MAX_LENGTH, penalty),
            )


class CountingModel(ScriptedModel):
    """A scripted model that counts its decoding steps."""

    steps = 0

    def step(self, prev_tokens, state):
        self.steps += 1
        return super().step(prev_tokens, state)


def test_heuristic_early_stop_takes_fewer_steps_and_never_finds_more():
    """The heuristic stop settles an image once its live beams, ending at the next word, could not
    enter its list: never later than the exact stop, and until then both searches are the same,
    so its best caption can score no higher. Without a length penalty both bounds are the same."""
    fewer = 0
    for seed in range(20):
        model = CountingModel(12, seed, scale=1.0, eos_bias=4.0)
        feats = torch.randn(4, 2, 12, generator=torch.Generator().manual_seed(seed))
        runs = {}
        for early_stop in ("exact", "heuristic"):
            model.steps = 0
            runs[early_stop] = (beam_search(model, feats, 3, MAX_LENGTH, 1.0, early_stop=early_stop), model.steps)
        (exact, exact_steps), (heuristic, heuristic_steps) = runs["exact"], runs["heuristic"]
        assert heuristic_steps <= exact_steps
        fewer += heuristic_steps < exact_steps
        for mine, best in zip(heuristic, exact):
            assert len(mine) == 3 and len({tuple(h.tokens) for h in mine}) == 3
            assert [h.score for h in mine] == sorted((h.score for h in mine), reverse=True)
            assert mine[0].score <= best[0].score + 1e-6
        assert_same(
            beam_search(model, feats, 3, MAX_LENGTH, 0.0, early_stop="heuristic"),
            beam_search(model, feats, 3, MAX_LENGTH, 0.0),
        )
    assert fewer >= 5
    with pytest.raises(ValueError, match="early_stop"):
        beam_search(model, feats, 3, MAX_LENGTH, 1.0, early_stop="never")
