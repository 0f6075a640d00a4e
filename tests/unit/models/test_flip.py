"""Test-time flip (`decoding.flip`): each decoder reads the image and its mirror, probabilities averaged."""

from __future__ import annotations

import pytest
import torch

from captioning.config import PARAMS_FILE
from captioning.inference.decoding import beam_search, greedy
from captioning.inference.predict import Captioner
from captioning.models import Ensemble, build_model, ensemble_config
from captioning.models.ensemble import View, with_flip
from captioning.settings import SettingsError, load_settings
from captioning.vocab import BOS, Vocabulary

torch.set_num_threads(1)

TINY = {"embed_dim": 24, "hidden_dim": 32, "attention_dim": 16, "dropout": 0.0}
VOCAB, CHANNELS, SIDE = 20, 16, 3


def attention_model(seed: int):
    torch.manual_seed(seed)
    return build_model({"decoder": "attention", **TINY}, VOCAB, CHANNELS).eval()


def mirror(features: torch.Tensor) -> torch.Tensor:
    """The features of the left-right mirrored image: the grid's columns in reverse order."""
    batch = features.size(0)
    return features.reshape(batch, SIDE, SIDE, CHANNELS).flip(2).reshape(batch, SIDE * SIDE, CHANNELS)


def test_a_mirror_that_reads_alike_decodes_as_the_image_alone():
    # The attention decoder does not know where a position is, so the mirrored grid gives the
    # same words, and its attention mapped back onto the image's grid is the image's own.
    model = attention_model(0)
    features = torch.randn(4, SIDE * SIDE, CHANNELS)
    both = torch.cat([features, mirror(features)], dim=1)
    flipped = with_flip(model)
    prev = torch.full((4,), BOS)
    with torch.no_grad():
        log_probs, _, weights = flipped.step(prev, flipped.init_state(both))
        alone, _, alone_weights = model.step(prev, model.init_state(features))
    assert torch.allclose(log_probs, alone.float(), atol=1e-5)
    assert torch.allclose(weights, alone_weights.float(), atol=1e-6)
    plain, views = beam_search(model, features, 3, 6), beam_search(flipped, both, 3, 6)
    assert [[h.tokens for h in image] for image in plain] == [[h.tokens for h in image] for image in views]


def test_each_member_is_averaged_over_both_views():
    a, b = attention_model(0), attention_model(1)
    pair = Ensemble(ensemble_config([a.config, b.config]), VOCAB, CHANNELS, [a, b]).eval()
    image, other = torch.randn(2, SIDE * SIDE, CHANNELS), torch.randn(2, SIDE * SIDE, CHANNELS)
    flipped = with_flip(pair)
    assert len(flipped.members) == 4 and all(isinstance(view, View) for view in flipped.members)
    prev = torch.full((2,), BOS)
    with torch.no_grad():
        log_probs, _, _ = flipped.step(prev, flipped.init_state(torch.cat([image, other], dim=1)))
        expected = sum(m.step(prev, m.init_state(f))[0].exp() for m in (a, b) for f in (image, other)) / 4
        assert torch.allclose(log_probs.exp(), expected, atol=1e-6)
        # Greedy decoding runs on it like on any model.
        assert len(greedy(flipped, torch.cat([image, other], dim=1), 5)) == 2
    with pytest.raises(ValueError, match="multiple of 2 positions"):
        flipped.init_state(torch.randn(1, 9, CHANNELS))


def test_flip_must_be_a_boolean():
    decoding = load_settings(PARAMS_FILE).decoding
    assert decoding.replace(flip=True).flip is True and decoding.replace(flip=False).flip is False
    for text in ("false", "yes", 1):
        with pytest.raises(SettingsError, match="decoding.flip=.*valid boolean"):
            decoding.replace(flip=text)
    vocab = Vocabulary.build(["a dog runs", "a cat sits"], 1)
    model = build_model({"decoder": "attention", **TINY}, len(vocab), CHANNELS)
    config = {"model": model.config, "encoder": "lite0", "feature_dim": CHANNELS}
    with pytest.raises(ValueError, match="decoding.flip"):
        Captioner(model, vocab, {**config, "decoding": {"flip": "yes"}})
    captioner = Captioner(model, vocab, {**config, "decoding": {"flip": True, "beam_size": 2}})
    features = torch.randn(2, 2 * SIDE * SIDE, CHANNELS)
    results = captioner.caption_features(features, return_attention=True)
    # Attention maps cover one view: the image's own grid.
    assert all(len(row) == SIDE * SIDE for result in results for row in result["attention"]["maps"])
    assert captioner.caption_features(features[:, : SIDE * SIDE], captioner.settings_for(flip=False))
