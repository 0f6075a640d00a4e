"""CIDEr-D over token ids, the n-gram frequencies packages carry, and consensus reranking."""

from __future__ import annotations

import json

import pytest
import torch

from captioning.config import PARAMS_FILE
from captioning.inference.cider import CiderD, NgramFrequencies, consensus
from captioning.inference.decoding import Hypothesis, rerank_by_consensus
from captioning.inference.model_package import PackageError, load_frequencies, save_package
from captioning.inference.predict import Captioner
from captioning.models import build_model
from captioning.settings import SettingsError, load_settings
from captioning.vocab import Vocabulary

TRAINING = [
    ["a dog runs on the grass", "a brown dog running on grass", "the dog runs outside"],
    ["a man rides a bike", "a man on a bicycle", "a person riding a bike down the street"],
    ["two children play in the water", "kids splash in a pool", "two kids play in water"],
]


def ids(vocab, text):
    return vocab.encode(text)


@pytest.fixture
def vocab():
    return Vocabulary.build([c for refs in TRAINING for c in refs], 1)


@pytest.fixture
def frequencies(vocab):
    return NgramFrequencies.of([[ids(vocab, c) for c in refs] for refs in TRAINING])


def test_frequencies_round_trip_keeps_every_weight(vocab, frequencies):
    """n-grams of a single image are not stored, yet every caption's vector is unchanged."""
    restored = NgramFrequencies.from_dict(json.loads(json.dumps(frequencies.to_dict())))
    assert len(restored.df) < len(frequencies.df)
    for caption in ["a dog runs on the grass", "a man rides a bicycle in the water", "zebra"]:
        assert restored.vector(ids(vocab, caption)) == frequencies.vector(ids(vocab, caption))
    references = [[ids(vocab, c) for c in refs] for refs in TRAINING]
    assert CiderD(references, restored).score(0, ids(vocab, "a dog runs")) == pytest.approx(
        CiderD(references).score(0, ids(vocab, "a dog runs"))
    )


def test_consensus_ranks_the_outlier_last(vocab, frequencies):
    candidates = ["a dog runs on the grass", "a brown dog runs on grass", "a dog runs", "a man rides a bike"]
    agreement = consensus([ids(vocab, c) for c in candidates], frequencies)
    assert min(range(4), key=agreement.__getitem__) == 3
    assert max(range(4), key=agreement.__getitem__) in (0, 1)
    assert consensus([ids(vocab, "a dog")], frequencies) == [0.0]
    assert consensus([], frequencies) == []


def test_rerank_puts_the_caption_the_beam_agrees_on_first(vocab, frequencies):
    beam = [
        Hypothesis(ids(vocab, text), score, score)
        for text, score in [
            ("a man rides a bike", -1.0),  # most probable, but alone in what it says
            ("a dog runs on the grass", -2.0),
            ("a brown dog runs on grass", -2.5),
            ("a dog runs on grass", -3.0),
        ]
    ]
    reranked = rerank_by_consensus(beam, frequencies)
    assert sorted(map(id, reranked)) == sorted(map(id, beam))
    assert reranked[-1] is beam[0] and reranked[0] is not beam[0]
    # Equal agreement keeps the beam's order.
    twins = [Hypothesis(ids(vocab, "a dog"), -1.0, -1.0), Hypothesis(ids(vocab, "a dog"), -2.0, -2.0)]
    assert rerank_by_consensus(twins, frequencies) == twins


def test_a_share_of_the_beam_score_pulls_the_choice_back_toward_the_likelier_caption(vocab, frequencies):
    beam = [
        Hypothesis(ids(vocab, text), score, score)
        for text, score in [
            ("a dog runs on the grass", -1.0),
            ("a brown dog runs on grass", -4.0),
            ("a dog runs on grass", -1.2),
        ]
    ]
    agreement = consensus([h.tokens for h in beam], frequencies)
    assert rerank_by_consensus(beam, frequencies, score_weight=0.0)[0] is beam[max(range(3), key=agreement.__getitem__)]
    # Each caption's agreement plus the weight times its beam score decides.
    for weight in (0.1, 1.0, 100.0):
        expected = max(range(3), key=lambda i: agreement[i] + weight * beam[i].score)
        assert rerank_by_consensus(beam, frequencies, score_weight=weight)[0] is beam[expected]
    # A large enough weight gives the beam's own order back.
    assert rerank_by_consensus(beam, frequencies, score_weight=100.0) == [beam[0], beam[2], beam[1]]
    decoding = load_settings(PARAMS_FILE).decoding
    assert decoding.replace(rerank_score_weight=0).rerank_score_weight == 0.0
    assert decoding.replace(rerank_score_weight=0.7).rerank_score_weight == 0.7
    for bad in (-0.1, "0.7", True, float("nan"), float("inf"), None):
        with pytest.raises(SettingsError, match="decoding.rerank_score_weight"):
            decoding.replace(rerank_score_weight=bad)


def test_captioner_reranks_by_consensus_with_the_packaged_frequencies(tmp_path, vocab, frequencies):
    torch.manual_seed(0)
    model_config = {"decoder": "attention", "embed_dim": 16, "hidden_dim": 24, "attention_dim": 8, "dropout": 0.0}
    model = build_model(model_config, len(vocab), 32)
    decoding = {"beam_size": 4, "max_length": 6, "rerank": "consensus"}
    config = {"model": model_config, "encoder": "lite0", "feature_dim": 32, "decoding": decoding}
    folder = save_package(tmp_path / "pkg", model, vocab, config, frequencies=frequencies)
    captioner = Captioner.load(folder, with_encoder=False)
    assert captioner.decoding.rerank == "consensus"
    assert load_frequencies(folder, captioner.config).df == {g: n for g, n in frequencies.df.items() if n > 1}

    features = torch.randn(3, 5, 32)
    plain = captioner.caption_features(features, captioner.settings_for(rerank="none"))
    reranked = captioner.caption_features(features)
    for before, after in zip(plain, reranked):
        options = [a["caption"] for a in before["alternatives"]]
        assert sorted(options) == sorted(a["caption"] for a in after["alternatives"])
        agreement = consensus([vocab.encode(text) for text in options], captioner.frequencies)
        assert after["caption"] == options[max(range(len(options)), key=agreement.__getitem__)]
    assert captioner.caption_features(features, captioner.settings_for(beam_size=1)) == captioner.caption_features(
        features, captioner.settings_for(beam_size=1, rerank="none")
    )

    # Without the frequencies, or with a damaged file, consensus is refused, not silently skipped.
    bare = save_package(tmp_path / "bare", model, vocab, config)
    with pytest.raises(PackageError, match="ngrams.json"):
        Captioner.load(bare, with_encoder=False).caption_features(features)
    unranked = Captioner.load(bare, with_encoder=False)
    assert unranked.caption_features(features, unranked.settings_for(rerank="none"))
    (folder / "ngrams.json").write_text('{"images": 1, "ngrams": []}')
    with pytest.raises(PackageError, match="checksum"):
        Captioner.load(folder, with_encoder=False)
    with pytest.raises(ValueError, match="decoding.rerank"):
        Captioner(model, vocab, {**config, "decoding": {**decoding, "rerank": "best"}})


def test_captioner_adds_the_packaged_share_of_the_beam_score(tmp_path, vocab, frequencies):
    torch.manual_seed(0)
    model_config = {"decoder": "attention", "embed_dim": 16, "hidden_dim": 24, "attention_dim": 8, "dropout": 0.0}
    model = build_model(model_config, len(vocab), 32)
    decoding = {
        "beam_size": 4,
        "max_length": 6,
        "rerank": "consensus",
        "length_penalty": 0.7,
        "rerank_score_weight": 100.0,
    }
    config = {"model": model_config, "encoder": "lite0", "feature_dim": 32, "decoding": decoding}
    folder = save_package(tmp_path / "pkg", model, vocab, config, frequencies=frequencies)
    captioner = Captioner.load(folder, with_encoder=False)
    assert captioner.decoding.rerank_score_weight == 100.0
    features = torch.randn(3, 5, 32)
    # At a weight this large the beam score decides: the beam's own best caption comes first.
    assert [r["caption"] for r in captioner.caption_features(features)] == [
        r["caption"] for r in captioner.caption_features(features, captioner.settings_for(rerank="none"))
    ]
    with pytest.raises(ValueError, match="decoding.rerank_score_weight"):
        Captioner(model, vocab, {**config, "decoding": {**decoding, "rerank_score_weight": -1}})


def test_consensus_in_arrays_equals_cider_pair_by_pair():
    # `consensus` scores every pair at once; each number must be the pairwise CIDEr-D of `similarity`.
    import random

    from captioning.inference.cider import similarity

    rng = random.Random(3)
    references = [[[rng.randrange(4, 40) for _ in range(rng.randrange(4, 12))] for _ in range(5)] for _ in range(60)]
    frequencies = NgramFrequencies.of(references)
    for trial in range(10):
        stem = [rng.randrange(4, 40) for _ in range(8)]
        beam = [
            stem[: rng.randrange(2, 8)] + [rng.randrange(4, 40) for _ in range(rng.randrange(0, 4))] for _ in range(6)
        ]
        evidence = [caption for refs in references[trial * 5 : trial * 5 + 6] for caption in refs]
        vectors = [frequencies.vector(tokens) for tokens in beam]
        outside = [frequencies.vector(tokens) for tokens in evidence]
        expected = [
            0.3 * 10 * sum(similarity(v, o) for j, o in enumerate(vectors) if j != i) / (len(vectors) - 1)
            + 0.7 * 10 * sum(similarity(v, ref) for ref in outside) / len(outside)
            for i, v in enumerate(vectors)
        ]
        assert consensus(beam, frequencies, evidence, 0.7) == pytest.approx(expected, abs=1e-9)
        # Evidence from a caption memory is pinned and laid out from arrays: the same numbers,
        # also for candidates with n-grams that no pinned caption has (words 40-44).
        pinned = NgramFrequencies(frequencies.df, frequencies.images)
        pinned.pin(evidence)
        assert pinned.block(evidence) is not None
        assert consensus(beam, pinned, evidence, 0.7) == pytest.approx(expected, abs=1e-9)
        beam[0] = beam[0] + [40, 41, 42, 43, 44]
        assert consensus(beam, pinned, evidence, 0.7) == pytest.approx(
            consensus(beam, frequencies, evidence, 0.7), abs=1e-9
        )
    assert consensus([[5, 6]], frequencies, evidence, 0.7) == pytest.approx(
        [0.7 * 10 * sum(similarity(frequencies.vector([5, 6]), ref) for ref in outside) / len(outside)]
    )
    assert consensus([[5, 6]], pinned, evidence, 0.7) == consensus([[5, 6]], frequencies, evidence, 0.7)
    assert consensus([[44]], pinned, evidence, 0.7) == pytest.approx([0.0])  # shares no n-gram at all
    assert pinned.block([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]) is None  # not pinned: dicts as before


def test_pinned_vectors_equal_computed_ones_and_outlive_the_cache(vocab, frequencies, monkeypatch):
    import captioning.inference.cider as cider

    captions = [vocab.encode(text) for text in ("a dog runs on the grass", "a man rides a bike")]
    fresh = NgramFrequencies(frequencies.df, frequencies.images)
    expected = [fresh.vector(tokens) for tokens in captions]
    frequencies.pin(captions)
    monkeypatch.setattr(cider, "VECTOR_CACHE", 1)  # every new caption now clears the ordinary cache
    for tokens in ([5, 6], [6, 7], [7, 8]):
        frequencies.vector(tokens)
    assert [frequencies.vector(tokens) for tokens in captions] == expected
    assert all(frequencies.vector(tokens) is frequencies._pinned[tuple(tokens)] for tokens in captions)
