"""Tokenisation as the caption scorer sees it, and the word map's contract."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from captioning.vocab import BOS, EOS, PAD, SPECIALS, UNK, Vocabulary, tokenize

# Expected outputs produced by the Stanford PTB tokenizer that pycocoevalcap runs
# (-lowerCase), with the scorer's punctuation list removed.
PTB_CASES = {
    "A dog's toy is red.": ["a", "dog", "'s", "toy", "is", "red"],
    "The boy doesn't want to go , don't you think?": [
        "the",
        "boy",
        "does",
        "n't",
        "want",
        "to",
        "go",
        "do",
        "n't",
        "you",
        "think",
    ],
    "She can't, won't; they're \"happy\" and I'm fine!": [
        "she",
        "ca",
        "n't",
        "wo",
        "n't",
        "they",
        "'re",
        "happy",
        "and",
        "i",
        "'m",
        "fine",
    ],
    "A man in a t-shirt -- running 3.5 miles & 50% $5 #1 a/b U.S. St. Louis": [
        "a",
        "man",
        "in",
        "a",
        "t-shirt",
        "running",
        "3.5",
        "miles",
        "&",
        "50",
        "%",
        "$",
        "5",
        "#",
        "1",
        "a/b",
        "u.s.",
        "st.",
        "louis",
    ],
    "Two dogs' bones, 'quoted' words `tick' and ``double'' quotes: end": [
        "two",
        "dogs",
        "bones",
        "quoted",
        "words",
        "tick",
        "and",
        "double",
        "quotes",
        "end",
    ],
    "1,000 people at 3:30 a:b hi,there o'clock, ain't gonna wanna cannot": [
        "1,000",
        "people",
        "at",
        "3:30",
        "a",
        "b",
        "hi",
        "there",
        "o'clock",
        "ai",
        "n't",
        "gon",
        "na",
        "wan",
        "na",
        "can",
        "not",
    ],
    "A boy on a slip 'n' slide at an at&t store .": [
        "a",
        "boy",
        "on",
        "a",
        "slip",
        "'n'",
        "slide",
        "at",
        "an",
        "at",
        "&",
        "t",
        "store",
    ],
    "  Extra   spaces\ttab\nnewline  ": ["extra", "spaces", "tab", "newline"],
    "children 's toys -word word- well-known a - b": ["children", "'s", "toys", "word", "word", "well-known", "a", "b"],
}


@pytest.mark.parametrize("text", sorted(PTB_CASES))
def test_tokenize_matches_ptb(text):
    assert tokenize(text) == PTB_CASES[text]


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_tokenize_agrees_with_the_scorers_tokenizer():
    """Run pycocoevalcap's own (Java) tokenizer on the same captions."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [t for t in PTB_CASES if "\n" not in t] + [
        "A black dog is running after a white dog in the snow .",
        "Two girls (sisters) play on the beach, laughing!",
        "A man's bike leans against a wall; it's raining.",
    ]
    data = {i: [{"caption": c}] for i, c in enumerate(captions)}
    scorer = PTBTokenizer().tokenize(data)
    for i, caption in enumerate(captions):
        expected = [w for w in scorer[i][0].split() if w not in {"-lrb-", "-rrb-"}]
        assert tokenize(caption) == expected, caption


@given(st.text(max_size=60))
def test_tokens_are_clean_words(text):
    for token in tokenize(text):
        assert token and token == token.lower()
        assert not any(ch.isspace() for ch in token)
        assert not set(token) <= set(".,?!;:'\"`-()[]{}")


def test_build_orders_by_frequency_and_respects_min_freq():
    captions = ["a dog runs .", "a dog sits", "A cat runs", "a bird"]
    vocab = Vocabulary.build(captions, min_freq=2)
    assert vocab.tokens[:4] == list(SPECIALS)
    assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    assert vocab.tokens[4:] == ["a", "dog", "runs"]  # a:4, then dog:2 and runs:2 alphabetically
    assert len(vocab) == 7
    assert "cat" not in vocab and "dog" in vocab
    assert len(Vocabulary.build(captions, min_freq=1)) == 4 + 6


def test_build_rejects_bad_min_freq():
    with pytest.raises(ValueError, match="min_freq"):
        Vocabulary.build(["a dog"], min_freq=0)


def test_encode_and_decode():
    vocab = Vocabulary.build(["a dog runs on the grass", "a dog"], min_freq=1)
    ids = vocab.encode("A dog runs on the beach!")
    assert ids[:5] == [vocab.index[w] for w in ["a", "dog", "runs", "on", "the"]]
    assert ids[5] == UNK and len(ids) == 6
    assert BOS not in ids and EOS not in ids
    assert vocab.encode("a dog runs on the grass", max_length=3) == ids[:3]
    assert vocab.encode("", max_length=5) == []
    assert vocab.decode([BOS] + ids + [EOS, PAD, vocab.index["dog"]]) == "a dog runs on the <unk>"
    assert vocab.decode([PAD, BOS, vocab.index["dog"], PAD]) == "dog"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([len(vocab)])


def test_decode_accepts_tensors():
    import torch

    vocab = Vocabulary.build(["a dog"], min_freq=1)
    assert vocab.decode(torch.tensor([vocab.index["a"], vocab.index["dog"], EOS])) == "a dog"


def test_dict_round_trip_and_fingerprint():
    vocab = Vocabulary.build(["a dog runs", "a cat sleeps"], min_freq=1)
    data = json.loads(json.dumps(vocab.to_dict()))
    again = Vocabulary.from_dict(data)
    assert again == vocab and again.fingerprint() == vocab.fingerprint()
    assert len(vocab.fingerprint()) == 64
    other = Vocabulary.build(["a dog runs", "a cat sleeps", "dog dog"], min_freq=1)  # same words, other order
    assert set(other.tokens) == set(vocab.tokens) and other.fingerprint() != vocab.fingerprint()


def test_from_dict_refuses_bad_data():
    vocab = Vocabulary.build(["a dog"], min_freq=1)
    data = vocab.to_dict()
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        Vocabulary.from_dict({**data, "tokens": data["tokens"] + ["cat"]})
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary.from_dict({"tokens": ["a", "dog"]})
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary.from_dict({"tokens": list(SPECIALS) + ["a", "a"]})
    with pytest.raises(ValueError, match="tokens"):
        Vocabulary.from_dict({"words": []})
