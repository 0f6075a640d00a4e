"""The captions of the training images nearest to an image: evidence for reranking a beam.

People describe similar pictures in similar words. The training images that look most like
a new one (cosine similarity of their mean-pooled encoder features), and the captions
written for them, sample what a reference caption of the new image is likely to say.
Consensus reranking (`decoding.rerank: consensus`) can weigh each beam caption's agreement
with those captions beside its agreement with the rest of the beam
(`decoding.rerank_neighbours`, `decoding.rerank_neighbour_weight`): the nearest-neighbour
consensus of Devlin et al. (2015) and of m-RNN (Mao et al., 2015), applied to the beam.

A model package carries its `CaptionMemory` in `neighbours.npz`: the training images' ids,
pooled features (float16, unit length) and captions (token ids, no BOS/EOS), plain arrays
read without pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

Tokens = list[int]


class CaptionMemoryError(ValueError):
    """A caption memory that is malformed, or does not fit the features it is asked about."""


def pool(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, C) float32 unit vectors: features (B, N, C) averaged over their positions."""
    array = (
        features.float().mean(dim=1).cpu().numpy()
        if isinstance(features, torch.Tensor)
        else np.asarray(features, dtype=np.float32).mean(axis=1)
    )
    return _unit(array)


def _unit(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


class CaptionMemory:
    """Training images (pooled features, captions) searchable by similarity to new images."""

    def __init__(self, image_ids: Sequence[str], pooled: np.ndarray, captions: Sequence[Sequence[Tokens]]):
        pooled = np.asarray(pooled)
        if pooled.ndim != 2 or len(pooled) != len(image_ids) or len(captions) != len(image_ids):
            raise CaptionMemoryError(
                f"a caption memory needs one pooled feature row and one caption list per image: "
                f"{len(image_ids)} ids, features {pooled.shape}, {len(captions)} caption lists"
            )
        if not len(image_ids):
            raise CaptionMemoryError("a caption memory needs at least one image")
        self.image_ids = [str(i) for i in image_ids]
        self.pooled = _unit(pooled)
        self.captions = [[list(map(int, caption)) for caption in caps] for caps in captions]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def dim(self) -> int:
        return int(self.pooled.shape[1])

    def nearest(self, pooled: np.ndarray, k: int) -> np.ndarray:
        """(B, k) indices of the most similar images, nearest first, for pooled query rows (B, C)."""
        pooled = np.asarray(pooled, dtype=np.float32)
        if pooled.ndim != 2 or pooled.shape[1] != self.dim:
            raise CaptionMemoryError(
                f"features of {pooled.shape[-1]} channels cannot be compared with a memory of "
                f"{self.dim}-channel features (another encoder?)"
            )
        k = max(1, min(int(k), len(self)))
        similarity = _unit(pooled) @ self.pooled.T
        index = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, index, axis=1), axis=1, kind="stable")
        return np.take_along_axis(index, order, axis=1)

    def evidence(self, features: torch.Tensor | np.ndarray, k: int) -> list[list[Tokens]]:
        """Per image of features (B, N, C): the captions of its k nearest training images."""
        return [
            [caption for image in row for caption in self.captions[image]]
            for row in self.nearest(pool(features), k).tolist()
        ]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        flat = [caption for caps in self.captions for caption in caps]
        with open(path, "wb") as handle:  # np.savez would add ".npz" to a name without it
            np.savez(
                handle,
                ids=np.array(self.image_ids, dtype=str),
                pooled=self.pooled.astype(np.float16),
                counts=np.array([len(caps) for caps in self.captions], dtype=np.int32),
                lengths=np.array([len(c) for c in flat], dtype=np.int32),
                tokens=np.array([t for c in flat for t in c], dtype=np.int32),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CaptionMemory":
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                ids, pooled = data["ids"].tolist(), data["pooled"].astype(np.float32)
                counts, lengths, tokens = data["counts"], data["lengths"], data["tokens"].tolist()
        except (OSError, ValueError, KeyError) as error:
            raise CaptionMemoryError(f"{path} is not a caption memory: {error}") from None
        if counts.sum() != len(lengths) or lengths.sum() != len(tokens) or (lengths < 0).any():
            raise CaptionMemoryError(f"{path}: caption counts and lengths do not add up")
        ends = np.cumsum(lengths).tolist()
        flat = [tokens[end - length : end] for end, length in zip(ends, lengths.tolist())]
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        return cls(ids, pooled, [flat[a:b] for a, b in zip(starts[:-1], starts[1:])])
