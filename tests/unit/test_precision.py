"""`decoding.precision`: the decoder captions in float32, under bfloat16 autocast, or with int8 weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captioning.models import build_model, quantize_int8
from captioning.predict import Captioner
from captioning.settings import SettingsError
from captioning.vocab import Vocabulary

torch.set_num_threads(1)

CAPTIONS = ["a dog runs on the grass", "a man rides a bike", "two children play in the water"]


def package_parts(decoder: str):
    torch.manual_seed(0)
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    config = {"decoder": decoder, "embed_dim": 32, "hidden_dim": 48, "attention_dim": 16, "dropout": 0.0}
    config.update({"layers": 2, "heads": 4, "ff_dim": 64} if decoder == "transformer" else {})
    model = build_model(config, len(vocab), 24).eval()
    package = {"model": model.config, "encoder": "lite0", "feature_dim": 24}
    return model, vocab, package


@pytest.mark.parametrize("decoder", ["attention", "transformer", "updown", "show_tell"])
def test_int8_quantizes_linear_and_lstm_layers_and_keeps_the_words(decoder):
    model, vocab, package = package_parts(decoder)
    features = torch.randn(3, 9, 24)
    plain = Captioner(model, vocab, {**package, "decoding": {"beam_size": 3, "precision": "float32"}}, device="cpu")
    int8 = Captioner(model, vocab, {**package, "decoding": {"beam_size": 3, "precision": "int8"}}, device="cpu")
    assert not any(type(m) in (nn.Linear, nn.LSTMCell) for m in int8.model.modules())
    assert any(type(m) in (nn.Linear, nn.LSTMCell) for m in plain.model.modules())  # the original is untouched
    expected = plain.caption_features(features)
    got = int8.caption_features(features)
    assert len(got) == len(expected) and all(result["caption"] for result in got)
    # int8 weights move the log-probabilities a little: the best caption's score stays close.
    for a, b in zip(expected, got):
        assert b["alternatives"][0]["log_prob"] == pytest.approx(a["alternatives"][0]["log_prob"], abs=0.5)


def test_bfloat16_decodes_under_autocast_with_float32_scores():
    model, vocab, package = package_parts("attention")
    features = torch.randn(2, 9, 24)
    bf16 = Captioner(model, vocab, {**package, "decoding": {"beam_size": 2, "precision": "bfloat16"}}, device="cpu")
    results = bf16.caption_features(features)
    assert [type(r["alternatives"][0]["log_prob"]) for r in results] == [float, float]
    assert bf16.model.reference_weight().dtype == torch.float32  # weights stay float32; autocast computes in bf16


def test_quantize_int8_copies_the_model():
    model, _, _ = package_parts("attention")
    quantized = quantize_int8(model)
    assert quantized is not model and type(model.lstm) is nn.LSTMCell
    assert quantized.reference_weight().dtype == torch.float32  # the embedding: the model's device and dtype


def test_an_unknown_precision_is_refused():
    model, vocab, package = package_parts("attention")
    with pytest.raises(SettingsError, match="decoding.precision"):
        Captioner(model, vocab, {**package, "decoding": {"precision": "int4"}})
