"""The agreement of a shadow candidate's caption with the served one: smoothed sentence BLEU-4 in
percent, the same figure as nltk's (the library the choice follows) on captions of four words or more."""

from __future__ import annotations

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from captioning.serving.agreement import agreement, words

PAIRS = [
    ("a dog runs on the grass", "a dog runs in the grass"),
    ("a red circle above a blue square", "a blue square below a red circle"),
    ("two men ride bikes down a hill", "a man is riding a bike"),
    ("a cat sits on a sofa next to a window", "a dog runs on the grass"),
    ("a man rides a bike", "a man rides a bike down a long steep hill in the rain"),
    ("a small green triangle on the left of a big yellow star", "a green triangle"),
]


@pytest.mark.parametrize("candidate, served", PAIRS)
def test_the_figure_is_nltks_smoothed_sentence_bleu4(candidate, served):
    expected = 100 * sentence_bleu([served.split()], candidate.split(), smoothing_function=SmoothingFunction().method2)
    assert agreement(candidate, served) == pytest.approx(expected, rel=1e-9)
    assert 0 < agreement(candidate, served) < 100


def test_identical_captions_agree_fully_whatever_their_length():
    for caption in ("a dog", "dog", "a red circle above a blue square"):
        assert agreement(caption, caption) == pytest.approx(100.0)
    assert agreement("A Dog, running!", "a dog running") == pytest.approx(100.0)  # case and punctuation aside
    assert words("A Dog, running!") == ["a", "dog", "running"]


def test_nonsense_and_empty_captions_do_not_agree():
    assert agreement("left left left left left left", "a dog runs on the grass") == 0.0
    assert agreement("", "a dog runs on the grass") == 0.0
    assert agreement("a dog runs", "") == 0.0
    assert agreement("", "") == 100.0  # both empty: the same answer


def test_a_closer_caption_agrees_more():
    served = "a red circle above a blue square"
    close = agreement("a red circle above a green square", served)
    far = agreement("a blue square", served)
    unrelated = agreement("the man walks his dog in the park", served)
    assert close > far > unrelated
