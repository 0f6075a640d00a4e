"""`decoding.precision`: the decoder captions in float32, with bfloat16 matrix products, or with int8 weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captioning.inference.predict import Captioner
from captioning.models import build_model, quantize_int8
from captioning.models.precision import Bfloat16LSTMCell, bfloat16_products
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


@pytest.mark.parametrize("decoder", ["attention", "transformer", "updown", "show_tell"])
def test_bfloat16_products_keep_the_words_and_float32_scores(decoder, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # as on a CPU with bfloat16 units
    model, vocab, package = package_parts(decoder)
    features = torch.randn(3, 9, 24)
    plain = Captioner(model, vocab, {**package, "decoding": {"beam_size": 3, "precision": "float32"}}, device="cpu")
    bf16 = Captioner(model, vocab, {**package, "decoding": {"beam_size": 3, "precision": "bfloat16"}}, device="cpu")
    assert not any(type(m) is nn.LSTMCell for m in bf16.model.modules())
    wide = [m for m in bf16.model.modules() if type(m) is nn.Linear and m.out_features >= 16]
    assert wide == [bf16.model.output]  # only the vocabulary projection stays float32
    assert sum(type(m) is nn.Linear for m in plain.model.modules()) > 1  # the original is untouched
    assert bf16.model.reference_weight().dtype == torch.float32  # activations stay float32
    with torch.no_grad():
        state, plain_state = bf16.model.init_state(features), plain.model.init_state(features)
        prev = torch.full((3,), 1)
        log_probs, _, _ = bf16.model.step(prev, state)
        expected, _, _ = plain.model.step(prev, plain_state)
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs, expected, atol=0.05, rtol=0.02)
    results = bf16.caption_features(features)
    assert len(results) == 3 and all(isinstance(r["alternatives"][0]["log_prob"], float) for r in results)


def test_bfloat16_lstm_cell_computes_an_lstm_cell():
    torch.manual_seed(0)
    cell = nn.LSTMCell(12, 8)
    with torch.no_grad():  # weights a bfloat16 holds exactly: only the products' rounding differs
        for weight in (cell.weight_ih, cell.weight_hh):
            weight.copy_(weight.bfloat16().float())
    x, h, c = (torch.randn(5, n).bfloat16().float() for n in (12, 8, 8))
    with torch.no_grad():
        expected = cell(x, (h, c))
        got = Bfloat16LSTMCell(cell)(x, (h, c))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_bfloat16_products_copy_the_model():
    model, _, _ = package_parts("transformer")
    converted = bfloat16_products(model)
    assert converted is not model
    assert model.decoder.layers[0].self_attn.in_proj_weight.dtype == torch.float32
    assert converted.decoder.layers[0].self_attn.in_proj_weight.dtype == torch.bfloat16
    assert not any(p.dtype == torch.bfloat16 for p in converted.parameters())  # bfloat16 weights are buffers


def test_quantize_int8_copies_the_model():
    model, _, _ = package_parts("attention")
    quantized = quantize_int8(model)
    assert quantized is not model and type(model.lstm) is nn.LSTMCell
    assert quantized.reference_weight().dtype == torch.float32  # the embedding: the model's device and dtype


def test_an_unknown_precision_is_refused():
    model, vocab, package = package_parts("attention")
    with pytest.raises(SettingsError, match="decoding.precision"):
        Captioner(model, vocab, {**package, "decoding": {"precision": "int4"}})


def test_each_precision_runs_only_where_it_pays(monkeypatch):
    from captioning.config import decoding_precision

    assert decoding_precision(torch.device("cpu"), "int8") == "int8"
    assert decoding_precision(torch.device("cuda"), "int8") == "float32"
    assert decoding_precision(torch.device("cuda"), "bfloat16") == "bfloat16"
    assert decoding_precision(torch.device("cpu"), "float32") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert decoding_precision(torch.device("cpu"), "bfloat16") == "float32"  # emulated bfloat16 would be slower
    model, vocab, package = package_parts("attention")
    captioner = Captioner(
        model, vocab, {**package, "decoding": {"beam_size": 2, "precision": "bfloat16"}}, device="cpu"
    )
    assert captioner.precision == "float32" and any(type(m) is nn.LSTMCell for m in captioner.model.modules())
