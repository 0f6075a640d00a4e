"""Ensembles: the members' mean word probabilities, decoded and packaged like any one decoder."""

from __future__ import annotations

import pytest
import torch

from captioning.inference.decoding import beam_search, greedy
from captioning.inference.model_package import load_package, save_package
from captioning.models import Ensemble, build_model, ensemble_config, model_config
from captioning.settings import SettingsError
from captioning.training import fingerprint
from captioning.vocab import BOS, Vocabulary
from harness.settings import test_settings

torch.set_num_threads(1)

TINY = {"embed_dim": 24, "hidden_dim": 32, "attention_dim": 16, "dropout": 0.0, "layers": 1, "heads": 2, "ff_dim": 48}
VOCAB, CHANNELS, POSITIONS = 20, 16, 7


def member(decoder: str, seed: int):
    torch.manual_seed(seed)
    return build_model({"decoder": decoder, **TINY}, VOCAB, CHANNELS).eval()


def ensemble_of(*models):
    config = ensemble_config([model.config for model in models])
    return Ensemble(config, VOCAB, CHANNELS, list(models)).eval()


def test_step_and_forward_average_the_members_probabilities():
    a, b = member("attention", 0), member("transformer", 1)
    both = ensemble_of(a, b)
    features = torch.randn(3, POSITIONS, CHANNELS)
    prev = torch.full((3,), BOS)
    with torch.no_grad():
        log_probs, state, weights = both.step(prev, both.init_state(features))
        expected = (a.step(prev, a.init_state(features))[0].exp() + b.step(prev, b.init_state(features))[0].exp()) / 2
        assert torch.allclose(log_probs.exp(), expected, atol=1e-6)
        assert weights.shape == (3, POSITIONS)  # mean of both members' attention
        assert {key.split(".")[0] for key in state} == {"0", "1"}

        tokens = torch.randint(4, VOCAB, (3, 5))
        tokens[:, 0] = BOS
        logits, aux = both(features, tokens)
        mean = (a(features, tokens)[0].softmax(-1) + b(features, tokens)[0].softmax(-1)) / 2
        assert torch.allclose(logits.softmax(-1), mean, atol=1e-6) and torch.isfinite(aux)


def test_an_ensemble_of_copies_decodes_as_the_model_itself():
    one = member("attention", 3)
    twin = member("attention", 3)
    features = torch.randn(4, POSITIONS, CHANNELS)
    single, double = beam_search(one, features, 3, 8), beam_search(ensemble_of(one, twin), features, 3, 8)
    for mine, theirs in zip(single, double):
        assert [h.tokens for h in mine] == [h.tokens for h in theirs]
        assert [h.log_prob for h in mine] == pytest.approx([h.log_prob for h in theirs], abs=1e-4)
    assert [h[0].tokens for h in greedy(one, features, 8)] == [
        h[0].tokens for h in greedy(ensemble_of(one, twin), features, 8)
    ]


def test_members_without_attention_weights():
    both = ensemble_of(member("show_tell", 0), member("show_tell", 1))
    _, _, weights = both.step(torch.full((2,), BOS), both.init_state(torch.randn(2, POSITIONS, CHANNELS)))
    assert weights is None


def test_package_round_trip(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "a cat sits on a mat", "two dogs play"] * 3, 1)
    models = [build_model({"decoder": d, **TINY}, len(vocab), CHANNELS) for d in ("attention", "transformer")]
    both = Ensemble(ensemble_config([m.config for m in models]), len(vocab), CHANNELS, models)
    save_package(tmp_path / "model", both, vocab, {"model": both.config, "encoder": "lite0", "feature_dim": CHANNELS})
    loaded, loaded_vocab, config = load_package(tmp_path / "model")
    assert isinstance(loaded, Ensemble) and config["model"]["decoder"] == "ensemble"
    assert [m["decoder"] for m in config["model"]["members"]] == ["attention", "transformer"]
    features = torch.randn(2, POSITIONS, CHANNELS)
    assert [h[0].tokens for h in greedy(loaded, features, 6)] == [h[0].tokens for h in greedy(both, features, 6)]


def test_configs():
    section = {"decoder": "attention", **TINY, "ensemble": ["transformer", "attention"]}
    settings = test_settings(model=section)
    members = settings.members()
    assert [m.model.decoder for m in members] == ["attention", "transformer", "attention"]
    assert [m.train.seed for m in members] == [settings.train.seed + n for n in range(3)]
    assert all(m.model.ensemble == [] for m in members)
    assert len(test_settings(model={**section, "ensemble": []}).members()) == 1
    entry = {"decoder": "transformer", "model": {"layers": 3}, "train": {"scst_epochs": 0, "seed": 7}}
    own = test_settings(model={**section, "ensemble": [entry]})
    assert [model_config(m.model.to_dict())["layers"] for m in own.members()] == [TINY["layers"], 3]
    assert (own.member(1).train.scst_epochs, own.member(1).train.seed) == (0, 7)
    for entry, message in [
        ("lstm", "model.ensemble"),
        ({"model": {}}, "decoder"),
        ({"decoder": "attention", "data": {}}, "data"),
        ({"decoder": "attention", "model": {"size": 3}}, "model.size"),
        ({"decoder": "attention", "train": 5}, "train"),
    ]:
        with pytest.raises(SettingsError, match=message):
            test_settings(model={**section, "ensemble": [entry]})
    with pytest.raises(ValueError, match="at least two"):
        build_model({"decoder": "ensemble", "members": [{"decoder": "attention"}]}, VOCAB, CHANNELS)
    nested = {"decoder": "ensemble", "members": [{"decoder": "attention"}, {"decoder": "attention"}]}
    with pytest.raises(ValueError, match="cannot contain an ensemble"):
        build_model({"decoder": "ensemble", "members": [nested, {"decoder": "attention"}]}, VOCAB, CHANNELS)


def test_single_decoder_runs_keep_their_resume_fingerprint():
    single = test_settings(model={"decoder": "attention", **TINY, "ensemble": []})
    listed = single.replace(model=single.model.replace(ensemble=["transformer"]).to_dict())
    assert fingerprint(single) != fingerprint(listed)
    assert fingerprint(listed.member(0)) == fingerprint(single)  # the first member is the single decoder's run
