"""Self-critical training: the CIDEr-D reward against pycocoevalcap, and caption sampling."""

from __future__ import annotations

import random

import pytest
import torch

from captioning.inference.decoding import mask_log_probs
from captioning.models import build_model
from captioning.training.scst import CiderD, keep_top_k, references_from_pairs, sample, scst_loss, strip
from captioning.vocab import BOS, EOS, PAD, UNK

WORDS = "a dog cat runs on the grass red ball two men play in park water jumps".split()


def _corpus(seed: int, images: int = 12):
    rng = random.Random(seed)
    caption = lambda: [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
    references = [[caption() for _ in range(rng.randint(3, 5))] for _ in range(images)]
    candidates = [caption() for _ in range(images)]
    return references, candidates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_matches_pycocoevalcap(seed):
    from pycocoevalcap.cider.cider import Cider

    references, candidates = _corpus(seed)
    # pycocoevalcap takes document frequencies from the scored set: score the same set.
    ids = {word: n + 4 for n, word in enumerate(WORDS)}
    cider = CiderD([[[ids[w] for w in ref] for ref in refs] for refs in references])
    ours = [cider.score(i, [ids[w] for w in cand]) for i, cand in enumerate(candidates)]
    gts = {i: [" ".join(ref) for ref in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(cand)] for i, cand in enumerate(candidates)}
    mean, theirs = Cider().compute_score(gts, res)
    assert ours == pytest.approx(list(theirs), abs=1e-9)
    assert sum(ours) / len(ours) == pytest.approx(mean, abs=1e-9)


def test_cider_d_rewards_a_reference_most():
    references, _ = _corpus(3)
    cider = CiderD(references)
    exact = cider.score(0, references[0][0])
    assert exact > cider.score(0, references[1][0])
    assert cider.score(0, []) == 0.0


def test_references_from_pairs_strips_special_tokens():
    tokens = torch.tensor([[BOS, 5, 6, EOS, PAD], [BOS, 7, EOS, PAD, PAD], [BOS, 8, 9, 10, EOS]])
    rows = torch.tensor([0, 1, 0]).numpy()
    assert references_from_pairs(rows, tokens, 2) == [[[5, 6, EOS], [8, 9, 10, EOS]], [[7, EOS]]]
    assert strip([BOS, 4, PAD, 5, EOS, 6]) == [4, 5, EOS]
    assert strip([BOS, 4, 5]) == [4, 5]  # cut at max_length: no EOS


@pytest.mark.parametrize("decoder", ["show_tell", "attention", "transformer"])
def test_sampling_obeys_the_decoding_rules_and_carries_gradients(decoder):
    torch.manual_seed(0)
    config = {
        "decoder": decoder,
        "embed_dim": 16,
        "hidden_dim": 32,
        "attention_dim": 16,
        "dropout": 0.0,
        "layers": 1,
        "heads": 2,
        "ff_dim": 32,
    }
    model = build_model(config, 30, 8)
    features = torch.randn(6, 4, 8)
    tokens, log_probs, mask = sample(model, features, max_length=5)
    assert tokens.shape == log_probs.shape == mask.shape and tokens.size(1) <= 6
    drawn = tokens[mask]
    assert not any(t in (PAD, BOS, UNK) for t in drawn.tolist())
    assert (tokens[:, 0] != EOS).all()  # no empty captions
    for row, keep in zip(tokens.tolist(), mask.tolist()):
        words = [t for t, k in zip(row, keep) if k]
        # Every caption ends with EOS within max_length words + 1, and nothing is kept after it.
        assert words[-1] == EOS and words.count(EOS) == 1 and len(words) <= 6
    assert torch.isfinite(log_probs).all() and (log_probs[~mask] == 0).all()

    # Each image's references use their own third of the words (an n-gram in every image's
    # references weighs nothing), so that the sampled captions earn different rewards.
    references = [[list(range(lo, lo + 8)), list(range(lo + 7, lo - 1, -1))] for lo in (4, 12, 20)]
    loss, reward = scst_loss(model, features[:3], [0, 1, 2], CiderD(references), samples=4, max_length=5)
    loss.backward()
    assert torch.isfinite(loss) and reward > 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_one_sample_per_image_is_refused():
    model = build_model({"decoder": "show_tell", "embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}, 20, 4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        scst_loss(model, torch.randn(2, 3, 4), [0, 0], CiderD([[[5]]]), samples=1, max_length=3)


def test_keep_top_k_leaves_the_k_most_likely_words():
    log_probs = torch.log_softmax(torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]]), dim=-1)
    kept = keep_top_k(log_probs, 2)
    assert torch.isfinite(kept).sum(dim=1).tolist() == [2, 2]
    assert torch.isfinite(kept[0, [1, 3]]).all() and torch.isfinite(kept[1, [0, 1]]).all()
    assert torch.equal(kept[torch.isfinite(kept)], log_probs[torch.isfinite(kept)])
    assert torch.equal(keep_top_k(log_probs, 10), log_probs)  # k beyond the vocabulary keeps all


def test_top_k_sampling_draws_only_among_the_k_most_likely_words():
    torch.manual_seed(0)
    config = {"decoder": "attention", "embed_dim": 16, "hidden_dim": 32, "attention_dim": 16, "dropout": 0.0}
    model = build_model(config, 30, 8).eval()
    features = torch.randn(64, 4, 8)
    tokens, log_probs, mask = sample(model, features, max_length=4, top_k=2)
    # Replay the model on the drawn prefixes: every drawn word is among that step's two most likely
    # allowed words, and its log-probability is renormalised over those two.
    with torch.no_grad():
        state = model.init_state(features)
        prev = torch.full((64,), BOS, dtype=torch.long)
        # Steps 0-3 may draw words; step 4 (max_length) may only end the caption.
        for step in range(min(tokens.size(1), 4)):
            step_log_probs, state, _ = model.step(prev, state)
            allowed = mask_log_probs(step_log_probs, step)
            best = allowed.topk(2, dim=-1).indices
            live = mask[:, step]
            assert (best[live] == tokens[live, step, None]).any(dim=1).all()
            top = torch.log_softmax(allowed.gather(1, best), dim=-1)
            picked = top.gather(1, (best == tokens[:, step, None]).float().argmax(1, keepdim=True)).squeeze(1)
            assert torch.allclose(picked[live], log_probs[live, step], atol=1e-5)
            prev = tokens[:, step]  # finished rows feed PAD on, as they did while sampling
