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
from typing import Any, NamedTuple, Sequence

import numpy as np

NGRAMS = 4
SIGMA = 6.0
VECTOR_CACHE = 200_000  # captions whose vectors are kept (about 0.5 KB each)

Tokens = Sequence[int]
# A caption as CIDEr-D sees it: tf-idf weight per n-gram, the norm per n, its length.
Vector = tuple[dict[tuple, float], list[float], int]


class Block(NamedTuple):
    """Several captions' tf-idf vectors as flat arrays: entry i is n-gram `ids[i]` (its number in
    `numbers`, kept by `NgramFrequencies`) of caption `rows[i]` with weight `weights[i]`; per
    caption its norms (captions, 4) and length."""

    numbers: dict[tuple, int]
    rows: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    norms: np.ndarray
    lengths: np.ndarray


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
        self._vectors: dict[tuple, Vector] = {}
        self._pinned: dict[tuple, Vector] = {}
        # log(images / df) per n-gram of the references. An n-gram of one image weighs as much as
        # an unseen one: log(max(1, df)) is 0 for both.
        self._idf = {gram: self.log_images - math.log(max(1.0, float(count))) for gram, count in df.items()}
        # Pinned captions' n-grams as numbers and weights, for `block`.
        self._gram_ids: dict[tuple, int] = {}
        self._pinned_arrays: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def of(cls, references: Sequence[Sequence[Tokens]]) -> "NgramFrequencies":
        """From each image's references (token ids)."""
        df: Counter = Counter()
        for refs in references:
            df.update({gram for ref in refs for gram in ngram_counts(ref)})
        return cls(df, len(references))

    def vector(self, tokens: Tokens) -> Vector:
        """The caption's tf-idf vector; remembered, since a caption memory's captions recur for
        every image they are near (the vectors are shared: never change one)."""
        key = tuple(tokens)
        cached = self._pinned.get(key) or self._vectors.get(key)
        if cached is None:
            if len(self._vectors) >= VECTOR_CACHE:
                self._vectors.clear()
            cached = self._vectors[key] = self._vector(key)
        return cached

    def pin(self, captions: Sequence[Tokens]) -> None:
        """Compute these captions' vectors now and keep them for good (a caption memory's: they
        recur as evidence for every image near them, so the first images need not pay for them)."""
        for tokens in captions:
            key = tuple(tokens)
            if key not in self._pinned:
                vec = (vector := self._vector(key))[0]
                self._pinned[key] = vector
                ids = [self._gram_ids.setdefault(gram, len(self._gram_ids)) for gram in vec]
                self._pinned_arrays[key] = (np.array(ids, dtype=np.int64), np.fromiter(vec.values(), float, len(vec)))

    def block(self, captions: Sequence[Tokens]) -> Block | None:
        """Pinned captions' vectors as one `Block` (None unless every caption is pinned): laying
        out a caption memory's evidence from arrays costs far less than from their dicts."""
        keys = [tuple(tokens) for tokens in captions]
        arrays = [self._pinned_arrays.get(key) for key in keys]
        if not keys or any(pair is None for pair in arrays):
            return None
        vectors = [self._pinned[key] for key in keys]
        return Block(
            numbers=self._gram_ids,
            rows=np.repeat(np.arange(len(keys)), [len(ids) for ids, _ in arrays]),
            ids=np.concatenate([ids for ids, _ in arrays]),
            weights=np.concatenate([weights for _, weights in arrays]),
            norms=np.array([norms for _, norms, _ in vectors], dtype=float).reshape(len(keys), NGRAMS),
            lengths=np.array([length for _, _, length in vectors], dtype=float),
        )

    def _vector(self, tokens: tuple) -> Vector:
        vec: dict[tuple, float] = {}
        norms = [0.0] * NGRAMS
        idf, unseen = self._idf, self.log_images
        for gram, tf in ngram_counts(tokens).items():
            weight = tf * idf.get(gram, unseen)
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


def similarities(candidates: Sequence[Vector], references: Sequence[Vector] | Block) -> np.ndarray:
    """(C, R) CIDEr-D (times 10) of each candidate against each reference, in array operations.

    The same numbers as `similarity` for every pair: only the candidates' n-grams count, so
    both sides are laid out on the columns of those n-grams. `references` may be a `Block`
    (`NgramFrequencies.block`): only its entries on those columns are summed.
    """
    columns: dict[tuple, int] = {}
    for vec, _, _ in candidates:
        for gram in vec:
            columns.setdefault(gram, len(columns))
    order = np.array([len(gram) - 1 for gram in columns], dtype=np.int64)  # n - 1 of each column's n-gram
    cand, cand_norms, cand_lengths = _layout(candidates, columns)
    if isinstance(references, Block):
        per_order = _block_sums(cand, order, columns, references)
        ref_norms, ref_lengths = references.norms, references.lengths
    else:
        # A beam against itself (consensus) is laid out once.
        same = references is candidates
        ref, ref_norms, ref_lengths = (cand, cand_norms, cand_lengths) if same else _layout(references, columns)
        clipped = np.minimum(cand[:, None, :], ref[None, :, :]) * ref[None, :, :]  # (C, R, n-grams)
        per_order = clipped @ (order[:, None] == np.arange(NGRAMS)).astype(float)
    norms = cand_norms[:, None, :] * ref_norms[None, :, :]
    ratio = np.divide(per_order, norms, out=np.zeros_like(per_order), where=norms > 0)
    penalty = np.exp(-((cand_lengths[:, None] - ref_lengths[None, :]) ** 2) / (2 * SIGMA**2))
    return 10.0 * ratio.sum(axis=2) * penalty / NGRAMS


def _layout(vectors: Sequence[Vector], columns: dict[tuple, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weights of `vectors` on `columns` (other n-grams dropped), their norms and lengths."""
    weights = np.zeros((len(vectors), len(columns)))
    for row, (vec, _, _) in enumerate(vectors):
        for gram, weight in vec.items():
            column = columns.get(gram)
            if column is not None:
                weights[row, column] = weight
    norms = np.array([norms for _, norms, _ in vectors], dtype=float).reshape(len(vectors), NGRAMS)
    lengths = np.array([length for _, _, length in vectors], dtype=float)
    return weights, norms, lengths


def _block_sums(cand: np.ndarray, order: np.ndarray, columns: dict[tuple, int], block: Block) -> np.ndarray:
    """Per candidate, reference and n, the clipped products summed (C, R, 4), from the block's
    entries whose n-gram is one of the candidates' (a reference shares a few of its n-grams)."""
    numbers = np.array([block.numbers.get(gram, -1) for gram in columns], dtype=np.int64)  # per column
    by_number = np.argsort(numbers)
    found = np.searchsorted(numbers[by_number], block.ids).clip(max=max(0, len(numbers) - 1))
    hit = numbers[by_number][found] == block.ids if len(numbers) else np.zeros(len(block.ids), bool)
    column, ref = by_number[found[hit]], block.weights[hit]  # -1 (no pinned caption has it) never hits
    clipped = np.minimum(cand[:, column], ref) * ref  # (C, hits)
    slot = block.rows[hit] * NGRAMS + order[column]
    size = len(block.norms) * NGRAMS
    sums = [np.bincount(slot, weights=row, minlength=size) for row in clipped]
    return np.array(sums, dtype=float).reshape(len(cand), len(block.norms), NGRAMS)


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
    if len(vectors) < 2:
        beam = np.zeros(len(vectors))
    else:
        pairs = similarities(vectors, vectors)
        np.fill_diagonal(pairs, 0.0)
        beam = pairs.sum(axis=1) / (len(vectors) - 1)
    if not evidence or not weight or not vectors:
        return beam.tolist()
    # A caption memory's evidence is pinned: laid out from its arrays; other evidence from its vectors.
    outside = similarities(vectors, frequencies.block(evidence) or [frequencies.vector(tokens) for tokens in evidence])
    return ((1.0 - weight) * beam + weight * outside.mean(axis=1)).tolist()
