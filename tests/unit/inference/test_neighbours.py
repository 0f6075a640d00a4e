"""The caption memory of the training images, and consensus reranking with their captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioning.config import PARAMS_FILE
from captioning.inference.cider import NgramFrequencies, consensus
from captioning.inference.decoding import Hypothesis, rerank_by_consensus
from captioning.inference.model_package import MEMORY_FILE, PackageError, load_memory, save_package
from captioning.inference.neighbours import CaptionMemory, CaptionMemoryError, pool
from captioning.inference.predict import Captioner
from captioning.models import build_model
from captioning.settings import SettingsError, load_settings
from captioning.vocab import Vocabulary

TRAINING = [
    ["a dog runs on the grass", "a brown dog running on grass", "the dog runs outside"],
    ["a man rides a bike", "a man on a bicycle", "a person riding a bike down the street"],
    ["two children play in the water", "kids splash in a pool", "two kids play in water"],
]


@pytest.fixture
def vocab():
    return Vocabulary.build([c for refs in TRAINING for c in refs], 1)


@pytest.fixture
def frequencies(vocab):
    return NgramFrequencies.of([[vocab.encode(c) for c in refs] for refs in TRAINING])


def memory_of(vocab, pooled):
    return CaptionMemory(["dog", "bike", "water"], pooled, [[vocab.encode(c) for c in refs] for refs in TRAINING])


def test_memory_finds_the_most_similar_images_and_survives_a_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(0)
    memory = memory_of(vocab, rng.normal(size=(3, 8)))
    # An image like "water", then "dog"; its features as (positions, channels) pool to that direction.
    query = 2.0 * memory.pooled[2] + 0.5 * memory.pooled[0]
    features = np.stack([query + 0.01 * rng.normal(size=8) for _ in range(4)])[None]
    assert memory.nearest(pool(features), 2).tolist() == [[2, 0]]
    assert memory.nearest(pool(features), 10).shape == (1, 3)  # no more than the memory holds
    assert memory.evidence(torch.from_numpy(features), 1) == [memory.captions[2]]
    assert memory.evidence(features, 2) == [memory.captions[2] + memory.captions[0]]

    restored = CaptionMemory.load(memory.save(tmp_path / "memory.npz"))
    assert restored.image_ids == memory.image_ids and restored.captions == memory.captions
    np.testing.assert_allclose(restored.pooled, memory.pooled, atol=2e-3)  # float16 on disk
    assert restored.nearest(pool(features), 3).tolist() == memory.nearest(pool(features), 3).tolist()


def test_memory_refuses_what_does_not_fit(tmp_path, vocab):
    with pytest.raises(CaptionMemoryError, match="one caption list per image"):
        CaptionMemory(["dog", "bike"], np.ones((3, 4)), [[[4]], [[5]]])
    with pytest.raises(CaptionMemoryError, match="at least one image"):
        CaptionMemory([], np.ones((0, 4)), [])
    memory = memory_of(vocab, np.eye(3, 8))
    with pytest.raises(CaptionMemoryError, match="another encoder"):
        memory.nearest(np.ones((1, 5)), 1)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(CaptionMemoryError, match="is not a caption memory"):
        CaptionMemory.load(broken)
    with open(broken, "wb") as handle:  # captions that do not add up to the counts
        np.savez(
            handle,
            ids=np.array(["a"]),
            pooled=np.ones((1, 2), np.float16),
            counts=np.array([2], np.int32),
            lengths=np.array([1], np.int32),
            tokens=np.array([4], np.int32),
        )
    with pytest.raises(CaptionMemoryError, match="do not add up"):
        CaptionMemory.load(broken)


def test_evidence_from_outside_the_beam_can_outvote_it(vocab, frequencies):
    beam = [
        Hypothesis(vocab.encode(text), score, score)
        for text, score in [
            ("a man rides a bike", -1.0),
            ("a man on a bike", -1.5),
            ("a dog runs on the grass", -2.0),
        ]
    ]
    evidence = [vocab.encode(c) for c in TRAINING[0]]
    # Without evidence (or at weight 0) the beam agrees on the man and the bike.
    assert rerank_by_consensus(beam, frequencies)[0] is not beam[2]
    assert consensus([h.tokens for h in beam], frequencies, evidence, 0.0) == consensus(
        [h.tokens for h in beam], frequencies
    )
    # Captions written for images like this one speak of a dog.
    assert rerank_by_consensus(beam, frequencies, evidence, 0.7)[0] is beam[2]
    alone = consensus([h.tokens for h in beam], frequencies, evidence, 1.0)
    assert alone[2] > max(alone[:2]) > 0.0


def test_neighbour_settings_are_checked():
    decoding = load_settings(PARAMS_FILE).decoding
    assert decoding.replace(rerank_neighbours=0, rerank_neighbour_weight=0.5).rerank_neighbours == 0
    assert decoding.replace(rerank_neighbours=20, rerank_neighbour_weight=1).rerank_neighbour_weight == 1.0
    for neighbours, weight in [(-1, 0.5), ("5", 0.5), (2.5, 0.5), (True, 0.5), (5, 1.5), (5, "0.5"), (5, -0.1)]:
        with pytest.raises(SettingsError, match="decoding.rerank_neighbour"):
            decoding.replace(rerank_neighbours=neighbours, rerank_neighbour_weight=weight)


def small_package(tmp_path, vocab, frequencies, memory, **decoding):
    torch.manual_seed(0)
    model_config = {"decoder": "attention", "embed_dim": 16, "hidden_dim": 24, "attention_dim": 8, "dropout": 0.0}
    model = build_model(model_config, len(vocab), 8)
    config = {
        "model": model_config,
        "encoder": "lite0",
        "feature_dim": 8,
        "decoding": {"beam_size": 5, "max_length": 6, "rerank": "consensus", **decoding},
    }
    return save_package(tmp_path / "pkg", model, vocab, config, frequencies=frequencies, memory=memory)


def test_captioner_reranks_with_the_captions_of_the_nearest_training_images(tmp_path, vocab, frequencies):
    features = torch.randn(3, 4, 8)
    plain = Captioner.load(small_package(tmp_path, vocab, frequencies, None), with_encoder=False)
    beams = [[a["caption"] for a in result["alternatives"]] for result in plain.caption_features(features)]
    # Each query image's nearest training image is captioned exactly like the last caption of
    # its beam: with all the weight on that evidence, that caption must come first.
    captions = [[vocab.encode(options[-1])] for options in beams]
    memory = CaptionMemory(["a", "b", "c"], pool(features), captions)
    folder = small_package(tmp_path, vocab, frequencies, memory, rerank_neighbours=1, rerank_neighbour_weight=1.0)
    captioner = Captioner.load(folder, with_encoder=False)
    assert captioner.decoding.rerank_neighbours == 1 and len(captioner.memory) == 3
    reranked = captioner.caption_features(features)
    assert [r["caption"] for r in reranked] == [options[-1] for options in beams]
    assert [sorted(a["caption"] for a in r["alternatives"]) for r in reranked] == [sorted(b) for b in beams]
    # 0 neighbours: the beam's own consensus, as without a memory.
    alone = captioner.settings_for(rerank_neighbours=0)
    assert captioner.caption_features(features, alone) == plain.caption_features(features)

    # The memory is checked like every other part of the package.
    config = json.loads((folder / "config.json").read_text())
    assert load_memory(folder, config).captions == captions
    (folder / MEMORY_FILE).write_bytes((folder / MEMORY_FILE).read_bytes()[:-10])
    with pytest.raises(PackageError, match="does not match the checksum"):
        Captioner.load(folder, with_encoder=False)
    # Asking for neighbours of a package without a memory is refused, not ignored.
    with pytest.raises(PackageError, match="caption memory"):
        plain.caption_features(features, plain.settings_for(rerank_neighbours=3))
    with pytest.raises(ValueError, match="rerank_neighbours"):
        plain.settings_for(rerank_neighbours=-2)
    bad = small_package(tmp_path, vocab, frequencies, None, rerank_neighbours="5")
    with pytest.raises(ValueError, match="rerank_neighbours"):
        Captioner.load(bad, with_encoder=False)
