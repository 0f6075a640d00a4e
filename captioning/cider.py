"""CIDEr-D over token ids: the self-critical reward and the consensus that reranks a beam.

CIDEr-D here is the metric pycocoevalcap computes (n = 1..4, tf-idf, clipped counts,
Gaussian length penalty, sigma 6, times 10), but its document frequencies come from the
whole training corpus once (`NgramFrequencies`), not from the captions being scored, so
scores are comparable across batches and a model package can carry them for inference.
The end token counts as a word: a caption cut off mid-phrase ("a man in a") scores less
than one that ends where references end.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

NGRAMS = 4
SIGMA = 6.0

Tokens = Sequence[int]
# A caption as CIDEr-D sees it: tf-idf weight per n-gram, the norm per n, its length.
Vector = tuple[dict[tuple, float], list[float], int]


def ngram_counts(tokens: Tokens, n_max: int = NGRAMS) -> Counter:
    tokens = tuple(tokens)
    return Counter(tokens[i : i + n] for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


class NgramFrequencies:
    """In how many images' references each n-gram occurs (document frequencies), and of how many images."""

    def __init__(self, df: Counter, images: int):
        if images < 1:
            raise ValueError("n-gram frequencies need the references of at least one image")
        self.df, self.images = df, images
        self.log_images = math.log(float(images))

    @classmethod
    def of(cls, references: Sequence[Sequence[Tokens]]) -> "NgramFrequencies":
        """From each image's references (token ids)."""
        df: Counter = Counter()
        for refs in references:
            df.update({gram for ref in refs for gram in ngram_counts(ref)})
        return cls(df, len(references))

    def vector(self, tokens: Tokens) -> Vector:
        vec: dict[tuple, float] = {}
        norms = [0.0] * NGRAMS
        for gram, tf in ngram_counts(tokens).items():
            # An n-gram of one image weighs as much as an unseen one: log(max(1, df)) is 0 for both.
            weight = tf * (self.log_images - math.log(max(1.0, float(self.df.get(gram, 0)))))
            vec[gram] = weight
            norms[len(gram) - 1] += weight * weight
        return vec, [math.sqrt(value) for value in norms], len(tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; n-grams of a single image are left out (they weigh as unseen ones do)."""
        return {"images": self.images, "ngrams": [[*gram, df] for gram, df in self.df.items() if df > 1]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NgramFrequencies":
        return cls(
            Counter({tuple(int(t) for t in row[:-1]): int(row[-1]) for row in data["ngrams"]}), int(data["images"])
        )


def similarity(candidate: Vector, reference: Vector) -> float:
    """CIDEr-D of a candidate against one reference, before the scale of 10."""
    vec, norms, length = candidate
    ref_vec, ref_norms, ref_length = reference
    sims = [0.0] * NGRAMS
    for gram, weight in vec.items():
        ref_weight = ref_vec.get(gram)
        if ref_weight is not None:
            # CIDEr-D clips the candidate's counts at the reference's.
            sims[len(gram) - 1] += min(weight, ref_weight) * ref_weight
    penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
    return (
        sum(
            sim / (norm * ref_norm) * penalty if norm and ref_norm else 0.0
            for sim, norm, ref_norm in zip(sims, norms, ref_norms)
        )
        / NGRAMS
    )


class CiderD:
    """CIDEr-D scores for captions of a fixed set of images, given as token ids."""

    def __init__(self, references: Sequence[Sequence[Tokens]], frequencies: NgramFrequencies | None = None):
        if not references:
            raise ValueError("CIDEr-D needs the references of at least one image")
        self.frequencies = frequencies or NgramFrequencies.of(references)
        self.references = [[self.frequencies.vector(ref) for ref in refs] for refs in references]

    def score(self, image: int, tokens: Tokens) -> float:
        """CIDEr-D of one caption (token ids, no BOS/EOS/PAD) for image number `image`."""
        candidate = self.frequencies.vector(tokens)
        refs = self.references[image]
        return 10.0 * sum(similarity(candidate, ref) for ref in refs) / len(refs)


def consensus(
    candidates: Sequence[Tokens], frequencies: NgramFrequencies, evidence: Sequence[Tokens] = (), weight: float = 0.0
) -> list[float]:
    """Each candidate's mean CIDEr-D against the other candidates (0 for a lone one).

    The candidate with the highest consensus is the minimum-Bayes-risk choice among them,
    with the others as equally likely stand-ins for the references. `evidence`: more
    stand-ins from outside the beam (the captions of the nearest training images); a
    candidate then scores (1 - weight) times its agreement with the others plus `weight`
    times its mean CIDEr-D against the evidence.
    """
    vectors = [frequencies.vector(tokens) for tokens in candidates]
    beam = [
        10.0 * sum(similarity(vec, other) for j, other in enumerate(vectors) if j != i) / (len(vectors) - 1)
        if len(vectors) > 1
        else 0.0
        for i, vec in enumerate(vectors)
    ]
    if not evidence or not weight:
        return beam
    outside = [frequencies.vector(tokens) for tokens in evidence]
    return [
        (1.0 - weight) * agreement + weight * 10.0 * sum(similarity(vec, ref) for ref in outside) / len(outside)
        for agreement, vec in zip(beam, vectors)
    ]
