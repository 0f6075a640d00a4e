"""Tokenisation and the word map shared by training, decoding and serving.

`tokenize` follows the Penn Treebank rules that pycocoevalcap's PTBTokenizer
applies before scoring (lower case, clitics such as "'s" and "n't" split off,
punctuation dropped), so the words a model learns are the words it is scored on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")

# Characters of the tokens the scorer removes (its list: '' ' `` ` . ? ! , : - -- ... ;)
# plus brackets and double quotes, which the PTB tokenizer rewrites into such tokens.
_PUNCTUATION_CHARS = set(".,?!;:'\"`-()[]{}")
# Always separate tokens, wherever they appear in a word.
_ALWAYS_SPLIT = re.compile(r"(\.\.\.|--|'n'|[?!;()\[\]{}\"`$%#&=])")
# Commas and colons split unless they sit between digits (1,000 and 3:30 stay whole).
_COMMA_COLON = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")
_CLITIC = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m|n't)$")
# Word forms the PTB tokenizer splits in two.
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "gotta": ["got", "ta"],
    "wanna": ["wan", "na"],
    "lemme": ["lem", "me"],
    "gimme": ["gim", "me"],
}
# Quote-initial words the PTB tokenizer keeps whole.
_KEEP_WORDS = {"'n'", "'em", "'til", "'cause"}
# Abbreviations whose final period belongs to the word.
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "no.", "mt.", "co.", "inc."}
_INITIALS = re.compile(r"^([a-z]\.)+[a-z]?\.?$")


def _split_word(word: str) -> list[str]:
    """PTB rules for one whitespace-separated chunk (already lower case)."""
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    if word in _KEEP_WORDS:
        return [word]
    tail: list[str] = []
    # A final period ends the sentence unless it belongs to an abbreviation or initials.
    if word.endswith(".") and word not in _ABBREVIATIONS and not _INITIALS.match(word):
        stripped = word.rstrip(".")
        tail.append(word[len(stripped) :])
        word = stripped
    head: list[str] = []
    # Opening single quote ('quoted): a separate token, unless it starts a clitic or a year ('90s).
    if word.startswith("'") and len(word) > 1 and not _CLITIC.match("x" + word) and not word[1].isdigit():
        head.append("'")
        word = word[1:]
    # Closing single quote or plural possessive (dogs').
    while word.endswith("'") and len(word) > 1:
        tail.insert(0, "'")
        word = word[:-1]
    if word.startswith("-") and len(word) > 1 and not word[1].isdigit():
        head.append("-")
        word = word[1:]
    if word.endswith("-") and len(word) > 1:
        tail.insert(0, "-")
        word = word[:-1]
    match = _CLITIC.match(word)
    if match and match.group(1) not in {"'", ""}:
        body = [match.group(1), match.group(2)]
    else:
        body = [word]
    return head + body + tail


def tokenize(text: str) -> list[str]:
    """Lower-case words of `text` as the caption scorer sees them, punctuation dropped.

    "A dog's toy, isn't it?" -> ["a", "dog", "'s", "toy", "is", "n't", "it"]
    """
    text = text.lower().replace("\n", " ")
    text = _ALWAYS_SPLIT.sub(r" \1 ", text)
    text = _COMMA_COLON.sub(lambda m: f" {m.group(1) or m.group(2)} ", text)
    tokens: list[str] = []
    for chunk in text.split():
        tokens.extend(_split_word(chunk))
    return [t for t in tokens if t and not set(t) <= _PUNCTUATION_CHARS]


class Vocabulary:
    """Word <-> id map with the four special ids fixed (PAD=0, BOS=1, EOS=2, UNK=3)."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {list(SPECIALS)}, got {tokens[: len(SPECIALS)]}")
        duplicates = [t for t, n in Counter(tokens).items() if n > 1]
        if duplicates:
            raise ValueError(f"duplicate tokens in vocabulary: {sorted(duplicates)[:10]}")
        self.tokens: list[str] = tokens
        self.index: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 1) -> "Vocabulary":
        """Words seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        words = [w for w, n in counts.items() if n >= min_freq and w not in SPECIALS]
        words.sort(key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, fingerprint={self.fingerprint()[:12]})"

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of `text` (unknown words -> UNK), at most `max_length`, no BOS/EOS."""
        ids = [self.index.get(t, UNK) for t in tokenize(text)]
        return ids if max_length is None else ids[:max_length]

    def decode(self, ids: Iterable[int]) -> str:
        """Caption text of `ids`: stops at EOS, skips PAD and BOS, shows UNK as <unk>."""
        words: list[str] = []
        for raw in ids:
            i = int(raw)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is outside the vocabulary of {len(self)} tokens")
            words.append(self.tokens[i])
        return " ".join(words)

    def fingerprint(self) -> str:
        """sha256 of the token list: equal fingerprints mean identical id assignments."""
        payload = json.dumps(self.tokens, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "fingerprint": self.fingerprint()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Vocabulary":
        """Rebuild from `to_dict()` output; a fingerprint that does not match is refused."""
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise ValueError("vocabulary data must be a dict with a 'tokens' list")
        vocab = cls(data["tokens"])
        expected = data.get("fingerprint")
        if expected is not None and expected != vocab.fingerprint():
            raise ValueError(
                f"vocabulary fingerprint mismatch: stored {expected[:12]}, tokens give {vocab.fingerprint()[:12]}"
            )
        return vocab
