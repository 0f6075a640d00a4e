"""How far a shadow candidate's caption agrees with the served one: a sentence BLEU-4 in percent.

Why BLEU-4, and why written out here: the agreement is computed in the API for every shadowed
image, so it must be cheap, need no Java (METEOR, SPICE) and no corpus statistics (CIDEr's
document frequencies mean nothing over one caption). Sentence BLEU-4 with the add-one
smoothing of Lin and Och (2004) on the 2- to 4-gram precisions is nltk's `sentence_bleu` with
`SmoothingFunction().method2`; nltk takes seconds to import, so the API carries these twenty
lines instead (tests/unit/serving checks both give the same figure on captions of four words
or more). One difference on purpose: a caption shorter than four words is not penalised for the
n-grams it cannot have, so two identical captions always agree 100 %.

The served caption is the reference. Words are lower-cased runs of letters and digits.
"""

from __future__ import annotations

import math
import re
from collections import Counter

MAX_ORDER = 4
WORD = re.compile(r"[a-z0-9]+")


def words(caption: str) -> list[str]:
    return WORD.findall(caption.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def agreement(candidate: str, served: str) -> float:
    """Smoothed sentence BLEU-4 of `candidate` against `served`, in percent (0 to 100)."""
    said, reference = words(candidate), words(served)
    if not said or not reference:
        return 100.0 if said == reference else 0.0
    log_precision = 0.0
    for n in range(1, MAX_ORDER + 1):
        counts, allowed = _ngrams(said, n), _ngrams(reference, n)
        matches = sum(min(count, allowed[gram]) for gram, count in counts.items())
        total = sum(counts.values())
        if n == 1 and matches == 0:
            return 0.0  # no word in common
        precision = matches / total if n == 1 else (matches + 1) / (total + 1)
        log_precision += math.log(precision) / MAX_ORDER
    brevity = min(0.0, 1.0 - len(reference) / len(said))  # log of BLEU's brevity penalty
    return 100.0 * math.exp(log_precision + brevity)
