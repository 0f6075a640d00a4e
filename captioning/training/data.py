"""The training data: (image, caption) pairs over cached features (`CaptionData`), the splits a
data query selects with their feature stores, and, for fine-tuning, image files decoded and
augmented by DataLoader workers."""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from captioning.settings import FeatureSettings, Settings
from captioning.training.base import TrainingError
from captioning.training.distributed import barrier

logger = logging.getLogger(__name__)

# Cached features up to this size are copied into memory; larger caches are read from the memory map.
PRELOAD_LIMIT_BYTES = 2 << 30
# Random resized crop for fine-tuning: area share and aspect ratio range. Mild, because
# captions speak about the whole picture ("two dogs on the grass").
CROP_AREA = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Training images a drift reference is fitted on at most (a seeded sample of them): plenty for its
# permutation threshold, and MSCOCO's 113k images would need a gigabyte of pooled features.
DRIFT_SAMPLE = 5000


@dataclass
class CaptionData:
    """Caption pairs: pair i is (features of image rows[i], tokens[i]).

    `features` is either the images' features copied into memory (a float16 tensor,
    row n = image n), one store's memory map indexed through `store_rows`, or, for images
    from several datasets, the stores' memory maps: image n is row store_rows[n] of
    features[store_index[n]]. None when training reads the image files (`paths`, image
    n = paths[n]) instead. `image_ids` are the images' keys (see `image_keys`).
    """

    features: Any
    store_rows: np.ndarray | None  # image n -> row in its memory map (None when preloaded)
    rows: np.ndarray  # (P,) image index per pair
    tokens: torch.Tensor  # (P, L) BOS ... EOS PAD..., int64
    image_ids: list[str]
    paths: list[str] = field(default_factory=list)
    store_index: np.ndarray | None = None  # image n -> its map in `features` (several stores only)

    def __len__(self) -> int:
        return len(self.rows)

    def image_features(self, images, device) -> torch.Tensor:
        """Float32 features (B, N, C) of images given by index."""
        images = np.asarray(images, dtype=np.int64)
        if self.store_rows is None:
            feats = self.features[torch.from_numpy(images)]
        elif self.store_index is None:
            feats = torch.from_numpy(np.asarray(self.features[self.store_rows[images]]))
        else:
            feats = torch.from_numpy(gather_rows(self.features, self.store_index[images], self.store_rows[images]))
        return feats.to(device).float()

    def batch_tokens(self, indices, device) -> torch.Tensor:
        tokens = self.tokens[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
        # Trailing all-PAD columns carry nothing: trim them for speed.
        length = int((tokens != 0).sum(1).max())
        return tokens[:, :length].to(device)

    def batch(self, indices, device, per_image: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and tokens of the pairs `indices`; per_image k > 1: the pairs come as k
        adjacent captions of each image, and the features hold one row per image."""
        indices = np.asarray(indices, dtype=np.int64)
        return self.image_features(self.rows[indices[::per_image]], device), self.batch_tokens(indices, device)

    def captions_per_image(self, k: int, seed: int) -> np.ndarray:
        """(images, k) pair indices: k captions of each image, drawn without repeats while it
        has enough (every caption once when it has exactly k), repeated when it has fewer."""
        rng = np.random.default_rng(seed)
        by_image = np.argsort(self.rows, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(self.rows, minlength=len(self.image_ids)))])
        chosen = np.empty((len(self.image_ids), k), dtype=np.int64)
        for image in range(len(self.image_ids)):
            own = rng.permutation(by_image[starts[image] : starts[image + 1]])
            if len(own) == 0:
                raise TrainingError(f"image {self.image_ids[image]} has no caption")
            chosen[image] = np.resize(own, k)
        return chosen


class FeatureStores(dict):
    """The feature stores of a selection by dataset name: an image id is unique only within
    its dataset, so each dataset has its own store (`<features dir>/<encoder>/<dataset>`)."""

    @property
    def dim(self) -> int:
        return next(iter(self.values())).dim

    @property
    def positions(self) -> int:
        return next(iter(self.values())).positions


def gather_rows(arrays: list, which: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """float16 (len(rows), N, C): item i is arrays[which[i]][rows[i]] (a chunk at a time, so
    gathering from memory maps needs little memory beyond the result)."""
    if len(arrays) == 1:
        return np.ascontiguousarray(arrays[0][rows])
    out = np.empty((len(rows), *arrays[0].shape[1:]), dtype=np.float16)
    for number, array in enumerate(arrays):
        chosen = np.flatnonzero(which == number)
        for start in range(0, len(chosen), chunk):
            part = chosen[start : start + chunk]
            out[part] = array[rows[part]]
    return out


def image_keys(records) -> list[str]:
    """Each record's image key: its image id, or `dataset/image id` when the records come from
    several datasets (`SelectedRecord.dataset`), whose ids may collide."""
    datasets = {getattr(record, "dataset", "") for record in records}
    if len(datasets) <= 1:
        return [record.image_id for record in records]
    return [f"{record.dataset}/{record.image_id}" for record in records]


def references_by_key(records) -> dict[str, list[str]]:
    """Image key (as `caption_data` names the images) -> reference captions."""
    return {key: list(record.captions) for key, record in zip(image_keys(records), records)}


def encode_captions(vocab, captions: list[str], max_length: int) -> torch.Tensor:
    """Captions -> (n, max_length + 2) int64: BOS, tokens, EOS, then PAD (0)."""
    from captioning.vocab import BOS, EOS

    out = torch.zeros(len(captions), max_length + 2, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = [BOS, *vocab.encode(caption, max_length), EOS]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _locate(images: list, store) -> tuple[list, np.ndarray, np.ndarray]:
    """(memory maps, map index per image, row per image). `store` is one FeatureStore for every
    image, or FeatureStores picked by each image's dataset."""
    if not isinstance(store, dict):
        return [store.array], np.zeros(len(images), dtype=np.int64), store.rows([r.image_id for r in images])
    missing = sorted({getattr(r, "dataset", "") for r in images} - set(store))
    if missing:
        raise TrainingError(f"no feature store for dataset(s) {missing} (stores: {sorted(store)})")
    names = list(store)
    which = np.zeros(len(images), dtype=np.int64)
    rows = np.zeros(len(images), dtype=np.int64)
    for number, name in enumerate(names):
        chosen = [n for n, record in enumerate(images) if record.dataset == name]
        which[chosen] = number
        rows[chosen] = store[name].rows([images[n].image_id for n in chosen])
    arrays = [store[name].array for name in names]
    shapes = {tuple(array.shape[1:]) for array in arrays}
    if len(shapes) > 1:
        raise TrainingError(f"feature stores {names} hold features of different shapes {sorted(shapes)}")
    return arrays, which, rows


def caption_data(records, store, vocab, max_length: int, preload: bool = True) -> CaptionData:
    """All (image, caption) pairs of `records`, features taken from `store`: one FeatureStore, or
    FeatureStores (dataset -> store) for records of several datasets; None: images are read instead."""
    keys = image_keys(records)
    first: dict[str, Any] = {}  # image key -> its first record
    for key, record in zip(keys, records):
        first.setdefault(key, record)
    image_ids, images = list(first), list(first.values())
    local = {key: n for n, key in enumerate(image_ids)}
    rows, captions = [], []
    for key, record in zip(keys, records):
        for caption in record.captions:
            rows.append(local[key])
            captions.append(caption)
    features: Any = None
    store_rows = store_index = None
    if store is not None:
        arrays, which, store_rows = _locate(images, store)
        size = len(images) * int(np.prod(arrays[0].shape[1:])) * 2
        if preload and size <= PRELOAD_LIMIT_BYTES:
            features = torch.from_numpy(gather_rows(arrays, which, store_rows))
            store_rows = None
        elif len(arrays) == 1:
            features = arrays[0]
        else:
            features, store_index = arrays, which
    tokens = encode_captions(vocab, captions, max_length)
    return CaptionData(
        features,
        store_rows,
        np.asarray(rows, dtype=np.int64),
        tokens,
        image_ids,
        [str(record.path) for record in images],
        store_index,
    )


def load_split(query_text: str, features: FeatureSettings, progress: bool, rank: int, cache: bool = True):
    """(records, FeatureStores) for a data query or a `+` union of queries; rank 0 fills the caches first.

    Each dataset of the selection has its own store, <features dir>/<encoder>/<dataset>.
    cache=False (fine-tuning reads the images): (records, None), no encoding.
    """
    from captioning.data.query import select
    from captioning.features.store import build_selection_features

    records = select(query_text)
    if not records:
        raise TrainingError(f"data query {query_text!r} selects no records")
    if not cache:
        return records, None
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(record.dataset, []).append(record)
    if rank == 0:
        build_selection_features(
            groups, features.encoder, features.dir, features.batch_size, progress, features.workers
        )
    barrier()
    # No work left: every image is cached.
    built = build_selection_features(groups, features.encoder, features.dir, features.batch_size, progress=False)
    stores = FeatureStores({name: store for name, (store, _) in built.items()})
    return records, stores


def validation_split(settings: Settings, progress: bool = False, rank: int = 0, cache: bool = True):
    """The validation records (the first train.val_images of them; 0: all) and their feature stores."""
    records, store = load_split(settings.data.val_query, settings.features, progress, rank, cache=cache)
    limit = settings.train.val_images
    return (records[:limit] if limit > 0 else records), store


def validation_data(settings: Settings, vocab) -> tuple[CaptionData, dict[str, list[str]]]:
    """The validation images with their cached features and references."""
    records, store = validation_split(settings)
    return caption_data(records, store, vocab, settings.vocab.max_length), references_by_key(records)


def ngram_frequencies(train_data: CaptionData):
    """Document frequencies of the training captions' n-grams (packaged for consensus reranking)."""
    from captioning.inference.cider import NgramFrequencies
    from captioning.training.scst import references_from_pairs

    return NgramFrequencies.of(references_from_pairs(train_data.rows, train_data.tokens, len(train_data.image_ids)))


def caption_memory(train_data: CaptionData):
    """The training images' pooled features and captions (packaged for reranking with the
    captions of an image's nearest training images); None when training reads image files."""
    from captioning.inference.neighbours import CaptionMemory, pool
    from captioning.training.scst import references_from_pairs
    from captioning.vocab import EOS

    if train_data.features is None:
        return None
    images = len(train_data.image_ids)
    pooled = np.concatenate(
        [
            pool(train_data.image_features(np.arange(start, min(start + 256, images)), "cpu"))
            for start in range(0, images, 256)
        ]
    )
    captions = [
        [caption[:-1] if caption and caption[-1] == EOS else caption for caption in refs]
        for refs in references_from_pairs(train_data.rows, train_data.tokens, images)
    ]
    return CaptionMemory(train_data.image_ids, pooled, captions)


def drift_reference(train_data: CaptionData, settings: Settings):
    """The training images' DriftReference (`settings.drift`), which the package carries for the
    service's drift monitor; None when drift is off, when training reads image files (the
    features a fine-tuned encoder computes are not the cached ones) or with too few images."""
    from captioning.features.drift import DriftReference, pool_finite

    drift = settings.drift
    if not drift.enabled or train_data.features is None:
        return None
    images = len(train_data.image_ids)
    if images < 2 * drift.window:
        logger.warning(
            "no drift reference in the package: %d training images, a window of %d needs %d",
            images,
            drift.window,
            2 * drift.window,
        )
        return None
    rng = np.random.default_rng(settings.train.seed)
    chosen = np.sort(rng.choice(images, size=min(images, DRIFT_SAMPLE), replace=False))
    pooled = np.concatenate(
        [
            pool_finite(train_data.image_features(chosen[start : start + 256], "cpu"))
            for start in range(0, len(chosen), 256)
        ]
    )
    if len(pooled) < len(chosen):
        logger.warning("drift reference: %d images with non-finite features left out", len(chosen) - len(pooled))
    if len(pooled) < 2 * drift.window:
        logger.warning("no drift reference in the package: %d images with finite features", len(pooled))
        return None
    return DriftReference.fit(pooled, drift.window, seed=settings.train.seed, encoder=settings.features.encoder)


class PairImages(torch.utils.data.Dataset):
    """Image files as encoder input for fine-tuning, decoded in DataLoader workers.

    A key is (image index, augmentation seed or None): the seed, not the worker's random
    state, decides the crop and flip, so a resumed run sees the very same pixels.
    """

    def __init__(self, paths: list[str], size: int):
        self.paths = paths
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, str | None]) -> torch.Tensor:
        from captioning.images import open_image, to_tensor

        index, seed = key
        image = open_image(self.paths[index])
        if seed is not None:
            image = augment(image, self.size, random.Random(seed))
        return to_tensor(image, self.size)


def augment(image, size: int, rng: random.Random):
    """Random resized crop (CROP_AREA, CROP_RATIO) to size x size, flipped left-right half the time.

    The flip swaps left and right: leave augmentation off for captions that name sides.
    """
    from PIL import Image

    width, height = image.size
    area = width * height * rng.uniform(*CROP_AREA)
    ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    crop_w = min(width, max(1, round(math.sqrt(area * ratio))))
    crop_h = min(height, max(1, round(math.sqrt(area / ratio))))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def pair_keys(data: CaptionData, batches: list[list[int]], augment_seed: str | None) -> list[list[tuple]]:
    """PairImages keys for batches of pair indices; augment_seed (None: plain images) and the
    pair index seed each pair's crop."""
    return [
        [(int(data.rows[i]), None if augment_seed is None else f"{augment_seed}:{i}") for i in batch]
        for batch in batches
    ]


def image_loader(
    paths: list[str], keys: list[list[tuple]], size: int, workers: int, device
) -> torch.utils.data.DataLoader:
    """Pixel batches (B, 3, size, size), one per list of PairImages keys, in order."""
    return torch.utils.data.DataLoader(
        PairImages(paths, size),
        batch_sampler=keys,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # else the loader draws its seed from the global RNG
    )


def encode_images(encoder, paths: list[str], batch_size: int, workers: int, device) -> torch.Tensor:
    """Features (images, N, C) float16 of image files with the encoder as it is now, computed
    as a package computes them (a copy with folded batch norms)."""
    import copy

    frozen = copy.deepcopy(encoder).optimize_for_inference()
    keys = [
        [(n, None) for n in range(start, min(start + batch_size, len(paths)))]
        for start in range(0, len(paths), batch_size)
    ]
    with torch.inference_mode():
        outputs = [
            frozen(pixels.to(device)).to(torch.float16).cpu()
            for pixels in image_loader(paths, keys, encoder.image_size, workers, device)
        ]
    return torch.cat(outputs)


def image_workers(features: FeatureSettings) -> int:
    """DataLoader workers decoding images: features.workers, or up to 2 when it is null."""
    return min(2, os.cpu_count() or 1) if features.workers is None else features.workers
