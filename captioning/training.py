"""Training a caption decoder on cached image features (or on images, fine-tuning the encoder).

`train(params)` selects the data by query, fills the feature cache, builds the
vocabulary from the training captions, trains with AdamW (warm-up then decay, label
smoothing, gradient clipping), validates with CIDEr after every epoch, stops early,
and saves the best model as a package. A checkpoint every `train.checkpoint_every`
steps and after every epoch lets a killed run resume to the very same weights: the
data order of an epoch comes from seed + epoch, and the RNG states are saved.

With `train.finetune_blocks` = k > 0 the last k stages of the encoder train too (their
own learning rate, `train.encoder_lr`): batches are then decoded from the image files
by DataLoader workers (optionally augmented, `train.augment`), validation encodes the
val images with the current encoder, and the package carries the encoder's weights.

Runs unchanged under `torchrun` (WORLD_SIZE > 1): DistributedDataParallel, a
DistributedSampler, and rank 0 alone writing files and calling callbacks; at the end
every rank's weights digest goes to out_dir/ranks.json, and ranks that disagree fail the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from captioning.package import load_checkpoint, save_checkpoint, save_package

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"
RANKS_FILE = "ranks.json"  # under torchrun: every rank's final weights digest
PACKAGE_DIR = "model"
# Cached features up to this size are copied into memory; larger caches are read from the memory map.
PRELOAD_LIMIT_BYTES = 2 << 30
# Keys that may change between a run and its resumption without changing the result.
_RESUME_NEUTRAL = {"train": {"progress", "checkpoint_every", "threads"}, "features": {"dir", "workers", "batch_size"}}
# Settings that do nothing while the encoder is frozen (finetune_blocks 0).
_FINETUNE_KEYS = ("finetune_blocks", "encoder_lr", "augment")
# Settings that do nothing without self-critical epochs (scst_epochs 0).
_SCST_KEYS = ("scst_epochs", "scst_lr", "scst_samples", "scst_top_k")
# Random resized crop for fine-tuning: area share and aspect ratio range. Mild, because
# captions speak about the whole picture ("two dogs on the grass").
CROP_AREA = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Steps in a row whose loss is NaN or inf (each skipped) before training gives up: a few are
# a bad batch, this many mean the weights or the learning rate are beyond repair.
MAX_NONFINITE_STEPS = 20


class TrainingError(RuntimeError):
    """Training cannot start or continue as asked."""


@dataclass
class TrainResult:
    package_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- data


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


def load_split(query_text: str, features_params: dict, batch_size: int, progress: bool, rank: int, cache: bool = True):
    """(records, FeatureStores) for a data query or a `+` union of queries; rank 0 fills the caches first.

    Each dataset of the selection has its own store, <features dir>/<encoder>/<dataset>.
    cache=False (fine-tuning reads the images): (records, None), no encoding.
    """
    from captioning.data.query import select
    from captioning.features import build_selection_features

    records = select(query_text)
    if not records:
        raise TrainingError(f"data query {query_text!r} selects no records")
    if not cache:
        return records, None
    encoder = features_params.get("encoder", "lite0")
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(record.dataset, []).append(record)
    if rank == 0:
        build_selection_features(
            groups,
            encoder,
            features_params.get("dir"),
            features_params.get("batch_size", batch_size),
            progress,
            features_params.get("workers"),
        )
    _barrier()
    # No work left: every image is cached.
    built = build_selection_features(groups, encoder, features_params.get("dir"), batch_size, progress=False)
    stores = FeatureStores({name: store for name, (store, _) in built.items()})
    return records, stores


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


# --------------------------------------------------------------------------- schedule and scoring


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over `warmup` steps, then cosine (or linear) decay to zero at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def quick_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """CIDEr-D and BLEU-4 in percent with the vocabulary's tokenizer (no Java start-up)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from captioning.vocab import tokenize

    gts = {key: [" ".join(tokenize(ref)) for ref in references[key]] for key in predictions}
    res = {key: [" ".join(tokenize(caption))] for key, caption in predictions.items()}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr": 100.0 * float(cider), "BLEU-4": 100.0 * float(bleu[3])}


def caption_batch(model, vocab, features: torch.Tensor, beam_size: int, max_length: int, length_penalty: float = 0.0):
    """Best caption per image: greedy when beam_size is 1, else beam search."""
    from captioning.decoding import beam_search, greedy

    if beam_size <= 1:
        hypotheses = greedy(model, features, max_length)
    else:
        hypotheses = beam_search(model, features, beam_size, max_length, length_penalty)
    return [vocab.decode(list(map(int, options[0].tokens))) for options in hypotheses]


@torch.inference_mode()
def validate(
    model, vocab, data: CaptionData, references: dict[str, list[str]], decoding: dict, device
) -> dict[str, Any]:
    """Captions of the validation images scored against their references, plus the plain val loss."""
    model.eval()
    predictions: dict[str, str] = {}
    ids = data.image_ids
    for start in range(0, len(ids), 64):
        chunk = list(range(start, min(start + 64, len(ids))))
        captions = caption_batch(
            model,
            vocab,
            data.image_features(chunk, device),
            int(decoding.get("beam_size", 1)),
            int(decoding.get("max_length", 20)),
            float(decoding.get("length_penalty", 0.0)),
        )
        predictions.update(zip(ids[start : start + len(chunk)], captions))
    total, count = 0.0, 0
    for start in range(0, len(data), 256):
        feats, tokens = data.batch(range(start, min(start + 256, len(data))), device)
        logits, _ = model(feats, tokens[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1), ignore_index=0, reduction="sum"
        )
        total += float(loss)
        count += int((tokens[:, 1:] != 0).sum())
    scores = quick_scores(predictions, {key: references[key] for key in predictions})
    return {
        "val_CIDEr": scores["CIDEr"],
        "val_BLEU-4": scores["BLEU-4"],
        "val_loss": total / max(1, count),
        "samples": dict(list(predictions.items())[:5]),
    }


def training_step(
    model,
    optimizer,
    scheduler,
    scaler,
    feats: torch.Tensor,
    tokens: torch.Tensor,
    label_smoothing: float = 0.0,
    alpha_c: float = 0.0,
    grad_clip: float = 0.0,
    encoder=None,
    dtype: torch.dtype | None = None,
) -> float:
    """One optimisation step on a batch (teacher forcing); returns the caption loss.

    With an `encoder` (fine-tuning), `feats` are pixels that it encodes first. `dtype`
    (`config.autocast_dtype`) runs the forward pass under autocast in float16 or bfloat16;
    None: float32. The loss is computed in float32; `scaler` is enabled for float16 only.
    """
    autocast = torch.autocast(feats.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        if encoder is not None:
            feats = encoder(feats)
        logits, aux = model(feats, tokens[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            tokens[:, 1:].reshape(-1),
            ignore_index=0,
            label_smoothing=label_smoothing,
        )
        total = loss + alpha_c * aux
    optimizer.zero_grad(set_to_none=True)
    if _nonfinite(total):
        return math.nan  # skipped: the caller counts it
    scaler.scale(total).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        # Every optimised parameter: the decoder's, and the encoder's trained stages when fine-tuning.
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return float(loss.detach())


def scst_step(
    model,
    optimizer,
    scheduler,
    feats: torch.Tensor,
    images,
    cider,
    samples: int,
    max_length: int,
    grad_clip: float = 0.0,
    top_k: int = 0,
) -> tuple[float, float]:
    """One self-critical step on a batch of images (full precision); returns the loss and the mean reward.

    `model` is the bare decoder (sampling goes through its `step`, not DistributedDataParallel's
    forward), so under torchrun the gradients are averaged here.
    """
    from captioning.scst import scst_loss

    loss, reward = scst_loss(model, feats, images, cider, samples, max_length, top_k)
    optimizer.zero_grad(set_to_none=True)
    if _nonfinite(loss):
        return math.nan, reward
    loss.backward()
    _average_gradients(model)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), reward


def _nonfinite(loss: torch.Tensor) -> bool:
    """True when the loss is NaN or inf on this rank or any other: the step is then skipped
    (no backward, no optimizer step), since one such step turns every weight into NaN.
    Every rank decides alike, before backward, so DistributedDataParallel never waits on a
    rank that skipped."""
    import torch.distributed as dist

    bad = torch.logical_not(torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


def _nonfinite_weights(*modules) -> list[str]:
    """Names of the parameters holding a NaN or inf, in the given modules (None ones skipped)."""
    return [
        name
        for module in modules
        if module is not None
        for name, tensor in module.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


# --------------------------------------------------------------------------- distributed helpers


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    # After the process group is gone (train() writing history.json) torchrun's RANK still tells.
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _average_gradients(model) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()


def _broadcast_flag(flag: bool, device) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, 0)
    return bool(tensor.item())


def backend_for(device_type: str) -> str:
    """The torch.distributed backend for one process per device: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if device_type == "cuda" else "gloo"


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 and float32 ones do not."""
    return dtype == torch.float16


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes and bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _record_rank_digests(model, device, out_dir: Path, rank: int, world: int) -> None:
    """Every rank's final weights digest, gathered to rank 0 and written to out_dir/ranks.json.

    DistributedDataParallel keeps the replicas equal only if every rank took every step alike;
    ranks that drifted apart would make rank 0's package one of several different models.
    """
    import torch.distributed as dist

    mine = torch.tensor(list(bytes.fromhex(weights_digest(model.state_dict()))), dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    digests = [bytes(tensor.tolist()).hex() for tensor in gathered]
    if rank != 0:
        return
    (out_dir / RANKS_FILE).write_text(
        json.dumps({"world_size": world, "weights_sha256": digests}, indent=1), encoding="utf-8"
    )
    if len(set(digests)) > 1:
        raise TrainingError(f"the {world} ranks ended with different weights (see {out_dir / RANKS_FILE})")


# --------------------------------------------------------------------------- the loop


def _fingerprint(params: dict) -> str:
    """What must not change for a checkpoint to be resumed."""
    relevant = {key: dict(params.get(key) or {}) for key in ("features", "vocab", "model", "train", "decoding")}
    data = params.get("data") or {}
    relevant["data"] = {"train_query": data.get("train_query"), "val_query": data.get("val_query")}
    for section, keys in _RESUME_NEUTRAL.items():
        for key in keys:
            relevant[section].pop(key, None)
    if not relevant["train"].get("finetune_blocks"):
        # A frozen-encoder run keeps the fingerprint it had before these settings existed.
        for key in _FINETUNE_KEYS:
            relevant["train"].pop(key, None)
    if not relevant["train"].get("scst_epochs"):
        for key in _SCST_KEYS:
            relevant["train"].pop(key, None)
    if relevant["train"].get("precision", "auto") == "auto":
        relevant["train"].pop("precision", None)  # the device's default, as before the setting existed
    if not relevant["train"].get("captions_per_image"):
        relevant["train"].pop("captions_per_image", None)  # 0: batches of captions, as before it existed
    if not relevant["model"].get("ensemble"):
        relevant["model"].pop("ensemble", None)  # a single decoder (or an ensemble's member)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _notify(callbacks: Iterable, name: str, *args) -> None:
    for callback in callbacks:
        method = getattr(callback, name, None)
        if method is not None:
            method(*args)


def train(
    params: dict[str, Any], callbacks: Iterable = (), out_dir: str | Path | None = None, resume: bool = True
) -> TrainResult:
    """Train a caption model as `params` say; return where the best package is and the history.

    With `resume`, an existing out_dir/checkpoint.pt from the same params is continued
    (or, when that run has finished, its result is returned without training).
    With `model.ensemble` (more decoders) each decoder trains in turn, in
    out_dir/members/<n>-<decoder> with seed train.seed + n and its own overrides of the
    `model` and `train` settings, and out_dir/model is their Ensemble.
    The per-epoch history is also written to out_dir/history.json.
    """
    from captioning.config import artifacts_dir
    from captioning.models import ensemble_members

    out_dir = Path(out_dir) if out_dir else artifacts_dir() / "train"
    try:
        members = ensemble_members(params.get("model") or {})  # every member's settings checked before training
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if len(members) == 1:
        result = _train_one(params, callbacks, out_dir, resume)
    else:
        result = _train_ensemble(params, members, list(callbacks), out_dir, resume)
    if _rank() == 0:
        (out_dir / HISTORY_FILE).write_text(json.dumps(result.history, indent=1), encoding="utf-8")
    return result


class _MemberRelay:
    """Passes a member's training events on as parts of one run: epochs and steps count on
    from the previous members', metrics carry the member's number, ends are the ensemble's."""

    def __init__(self, callbacks: list, params: dict[str, Any]):
        self.callbacks, self.params = callbacks, params
        self.member, self.epochs, self.steps, self.started = 0, 0, 0, False

    def next_member(self, result: "TrainResult") -> None:
        self.member += 1
        self.epochs += len(result.history)
        self.steps += int(result.history[-1].get("step", 0)) if result.history else 0

    def on_train_start(self, info: dict[str, Any]) -> None:
        if not self.started:
            self.started = True
            _notify(self.callbacks, "on_train_start", {**info, "params": self.params})

    def on_batch_end(self, step: int, loss: float) -> None:
        _notify(self.callbacks, "on_batch_end", self.steps + step, loss)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        _notify(self.callbacks, "on_epoch_end", self.epochs + epoch, {**metrics, "member": self.member})

    def on_train_failed(self, error: BaseException) -> None:
        _notify(self.callbacks, "on_train_failed", error)


def _train_ensemble(
    params: dict[str, Any], members: list[dict[str, Any]], callbacks: list, out_dir: Path, resume: bool
) -> TrainResult:
    """Train each member (resuming or reusing its own run), then package and validate the ensemble."""
    import copy

    from captioning.config import get_device
    from captioning.models import Ensemble, ensemble_config
    from captioning.package import load_frequencies, load_memory, load_package

    train_p = params.get("train") or {}
    seed = int(train_p.get("seed", 42))
    runs = []
    for number, member in enumerate(members):
        member_params = copy.deepcopy(params)
        member_params["model"].update(member["model"], decoder=member["decoder"], ensemble=[])
        member_params["train"]["seed"] = seed + number
        unknown = sorted(set(member["train"]) - set(train_p))
        if unknown:
            raise TrainingError(f"ensemble member {number} ({member['decoder']}) sets unknown train settings {unknown}")
        member_params["train"].update(member["train"])
        if int(member_params["train"].get("finetune_blocks", 0) or 0):
            raise TrainingError(
                "an ensemble (model.ensemble) needs a frozen encoder (train.finetune_blocks 0): "
                "its members read the same cached features"
            )
        runs.append(member_params)
    relay = _MemberRelay(callbacks, params)
    results, history = [], []
    for number, (member, member_params) in enumerate(zip(members, runs)):
        member_dir = out_dir / "members" / f"{number}-{member['decoder']}"
        result = _train_one(member_params, [relay], member_dir, resume)
        history += [{**row, "epoch": relay.epochs + row["epoch"], "member": number} for row in result.history]
        relay.next_member(result)
        results.append(result)
    try:
        if _rank() != 0:
            return TrainResult(out_dir / PACKAGE_DIR, {}, history)
        device = get_device()
        loaded = [load_package(result.package_dir, device) for result in results]
        vocab = loaded[0][1]
        if any(other.fingerprint() != vocab.fingerprint() for _, other, _ in loaded[1:]):
            raise TrainingError("the ensemble's members were trained with different vocabularies")
        feature_dim = loaded[0][0].feature_dim
        config = ensemble_config([model.config for model, _, _ in loaded])
        ensemble = Ensemble(config, len(vocab), feature_dim, [model for model, _, _ in loaded])
        val_data, references = _validation_data(params, vocab)
        val = validate(
            ensemble,
            vocab,
            val_data,
            references,
            {**(params.get("decoding") or {}), "beam_size": train_p.get("val_beam_size", 1)},
            device,
        )
        samples = val.pop("samples")
        best = {"epoch": relay.epochs + 1, "member": "ensemble", **val}
        package_params = {**params, "model": config}
        # The members learnt from the same captions and features: the first one's n-gram
        # frequencies and caption memory are theirs.
        frequencies = load_frequencies(results[0].package_dir, loaded[0][2])
        memory = load_memory(results[0].package_dir, loaded[0][2])
        save_package(
            out_dir / PACKAGE_DIR,
            ensemble,
            vocab,
            _package_config(package_params, feature_dim, best),
            frequencies=frequencies,
            memory=memory,
        )
        logger.info(
            "ensemble of %s: %s",
            [m["decoder"] for m in members],
            {k: round(v, 4) for k, v in val.items() if isinstance(v, float)},
        )
        _notify(callbacks, "on_epoch_end", relay.epochs + 1, {**val, "samples": samples})
        result = TrainResult(out_dir / PACKAGE_DIR, best, history + [best])
        _notify(callbacks, "on_train_end", result)
        return result
    except BaseException as error:
        _notify(callbacks, "on_train_failed", error)
        raise


def _validation_split(params: dict[str, Any], progress: bool = False, rank: int = 0, cache: bool = True):
    """The validation records (the first train.val_images of them; 0: all) and their feature stores."""
    data_p, train_p = params.get("data") or {}, params.get("train") or {}
    records, store = load_split(
        data_p["val_query"],
        params.get("features") or {},
        int(train_p.get("batch_size", 64)),
        progress,
        rank,
        cache=cache,
    )
    limit = int(train_p.get("val_images", 500))
    return (records[:limit] if limit > 0 else records), store


def _validation_data(params: dict[str, Any], vocab) -> tuple[CaptionData, dict[str, list[str]]]:
    """The validation images with their cached features and references."""
    records, store = _validation_split(params)
    max_length = int((params.get("vocab") or {}).get("max_length", 22))
    return caption_data(records, store, vocab, max_length), references_by_key(records)


def _train_one(params: dict[str, Any], callbacks: Iterable, out_dir: Path, resume: bool) -> TrainResult:
    """Train one decoder (see `train`)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from captioning.config import autocast_dtype, get_device
    from captioning.decoding import check_flip, check_neighbours, check_rerank, check_score_weight
    from captioning.encoder import ENCODERS, build_encoder
    from captioning.models import build_model
    from captioning.vocab import Vocabulary

    callbacks = list(callbacks)
    data_p, feat_p = params.get("data") or {}, params.get("features") or {}
    vocab_p, model_p = params.get("vocab") or {}, params.get("model") or {}
    train_p, decoding_p = params.get("train") or {}, params.get("decoding") or {}
    for key in ("train_query", "val_query"):
        if not data_p.get(key):
            raise TrainingError(f"params data.{key} is missing")
    try:
        # The package would not load otherwise.
        check_rerank(str(decoding_p.get("rerank", "none")))
        check_flip(decoding_p.get("flip", False))
        check_neighbours(decoding_p.get("rerank_neighbours", 0), decoding_p.get("rerank_neighbour_weight", 0.97))
        check_score_weight(decoding_p.get("rerank_score_weight", 0.0))
        precision = str(train_p.get("precision", "auto"))
        autocast_dtype(get_device(), precision)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if decoding_p.get("rerank_neighbours") and int(train_p.get("finetune_blocks", 0) or 0):
        raise TrainingError(
            "decoding.rerank_neighbours needs the training images' cached features: "
            "it cannot be used with a fine-tuned encoder (train.finetune_blocks)"
        )

    threads = int(train_p.get("threads", 0) or 0)
    previous_threads = torch.get_num_threads()
    if threads > 0:
        # Small decoders on a busy CPU run far faster on one thread than on contended several.
        torch.set_num_threads(threads)
    started_dist = False
    if _distributed() and not dist.is_initialized():
        local = get_device()
        if local.type == "cuda":
            torch.cuda.set_device(local)  # NCCL's collectives run on the current device: this rank's GPU
        dist.init_process_group(backend_for(local.type))
        started_dist = True
    try:
        rank, world = _rank(), (dist.get_world_size() if dist.is_initialized() else 1)
        device = get_device()
        dtype = autocast_dtype(device, precision)
        checkpoint_path, package_dir = out_dir / CHECKPOINT_FILE, out_dir / PACKAGE_DIR
        seed = int(train_p.get("seed", 42))
        progress = bool(train_p.get("progress", True)) and rank == 0
        fingerprint = _fingerprint(params)

        checkpoint = None
        if resume and checkpoint_path.is_file():
            checkpoint = load_checkpoint(checkpoint_path)
            if checkpoint.get("fingerprint") != fingerprint:
                raise TrainingError(
                    f"{checkpoint_path} was written with other params; use another output folder "
                    "or start afresh (--no-resume)"
                )
            if checkpoint.get("finished"):
                result = TrainResult(package_dir, checkpoint["best"], checkpoint["history"])
                if rank == 0:
                    _notify(callbacks, "on_train_end", result)
                return result

        _seed_everything(seed)
        batch_size = int(train_p.get("batch_size", 64))
        finetune = int(train_p.get("finetune_blocks", 0) or 0)
        if finetune < 0:
            raise TrainingError(f"train.finetune_blocks must be 0 (frozen encoder) or more, not {finetune}")
        per_image = int(train_p.get("captions_per_image", 0) or 0)
        if per_image < 0 or per_image > batch_size:
            raise TrainingError(
                f"train.captions_per_image must be 0 (batches of captions) or 1..batch_size "
                f"({batch_size}), not {per_image}"
            )
        if per_image and finetune:
            raise TrainingError("train.captions_per_image needs cached features (train.finetune_blocks 0)")
        encoder_name = feat_p.get("encoder", "lite0")
        train_records, train_store = load_split(
            data_p["train_query"], feat_p, batch_size, progress, rank, cache=not finetune
        )
        val_records, val_store = _validation_split(params, progress, rank, cache=not finetune)

        if checkpoint is not None:
            vocab = Vocabulary.from_dict(checkpoint["vocab"])
        else:
            captions = [caption for record in train_records for caption in record.captions]
            vocab = Vocabulary.build(captions, int(vocab_p.get("min_freq", 5)))
        max_length = int(vocab_p.get("max_length", 22))
        train_data = caption_data(train_records, train_store, vocab, max_length)
        frequencies = _ngram_frequencies(train_data)
        # Only a package that reranks with neighbours carries them (for MSCOCO they would weigh 300 MB).
        memory = _caption_memory(train_data) if decoding_p.get("rerank_neighbours") else None
        val_data = caption_data(val_records, val_store, vocab, max_length)
        references = references_by_key(val_records)

        encoder = core_encoder = None
        groups: list[dict[str, Any]] = []
        if finetune:
            # Never optimize_for_inference() here: folded batch norms cannot train.
            encoder = core_encoder = build_encoder(encoder_name).to(device)
            try:
                trainable = encoder.finetune(finetune)
            except ValueError as error:
                raise TrainingError(f"train.{error}") from None
            groups.append({"params": trainable, "lr": float(train_p.get("encoder_lr", 1e-4))})
            if world > 1:
                encoder = torch.nn.parallel.DistributedDataParallel(
                    encoder, device_ids=[device.index] if device.type == "cuda" else None
                )
        workers = feat_p.get("workers")
        workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
        feature_dim = ENCODERS[encoder_name].feature_dim if finetune else train_store.dim

        _seed_everything(seed)  # the initial weights depend on the seed only
        model = build_model(model_p, len(vocab), feature_dim).to(device)
        core = model
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        lr = float(train_p.get("lr", 5e-4))
        if not 0 < lr <= torch.finfo(torch.float32).max:
            # AdamW fails deep inside its step on a rate that float32 cannot hold.
            raise TrainingError(f"train.lr must be a positive number a float32 can hold, not {lr}")
        optimizer = torch.optim.AdamW(
            [{"params": list(model.parameters())}, *groups],
            lr=lr,
            weight_decay=float(train_p.get("weight_decay", 0.0)),
        )
        # captions_per_image k: the sampler draws images, each step takes batch_size // k of them
        # with k captions each, and the decoder does its image-side work once per image.
        step_items = batch_size // per_image if per_image else batch_size  # images or captions per step
        sampler = torch.utils.data.DistributedSampler(
            range(len(train_data.image_ids) if per_image else len(train_data)),
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        steps_per_epoch = math.ceil(len(sampler) / step_items)
        epochs = int(train_p.get("epochs", 8))
        total_steps = epochs * steps_per_epoch
        warmup = int(train_p.get("warmup_steps", 0))
        schedule_name = str(train_p.get("schedule", "cosine"))
        scst_epochs = int(train_p.get("scst_epochs", 0) or 0)
        scst_samples = int(train_p.get("scst_samples", 5))
        scst_top_k = int(train_p.get("scst_top_k", 5) or 0)
        if scst_epochs and finetune:
            raise TrainingError(
                "self-critical epochs (train.scst_epochs) need a frozen encoder (train.finetune_blocks 0)"
            )
        # Self-critical epochs run at their own constant rate after the cross-entropy schedule.
        scst_factor = float(train_p.get("scst_lr", 1e-5)) / float(train_p.get("lr", 5e-4))
        phase = {"scst": False}
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: scst_factor if phase["scst"] else lr_factor(step, warmup, total_steps, schedule_name),
        )
        scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(dtype))
        label_smoothing = float(train_p.get("label_smoothing", 0.0))
        grad_clip = float(train_p.get("grad_clip", 0.0))
        alpha_c = float(train_p.get("alpha_c", 0.0))
        patience = int(train_p.get("patience", 3))
        checkpoint_every = int(train_p.get("checkpoint_every", 500))

        state = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "best": {},
            "bad_epochs": 0,
            "history": [],
            "loss_sum": 0.0,
            "loss_count": 0,
            "reward_sum": 0.0,
            "skipped": 0,
            "nonfinite_run": 0,
        }
        cider = None
        if checkpoint is not None:
            core.load_state_dict(checkpoint["model"])
            if core_encoder is not None:
                core_encoder.backbone.load_state_dict(checkpoint["encoder"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            state.update({key: checkpoint.get(key, state[key]) for key in state})
            _set_rng_state(checkpoint["rng"])
            logger.info("resuming from %s at epoch %d batch %d", checkpoint_path, state["epoch"], state["batch"])

        def write_checkpoint(finished: bool = False) -> None:
            if rank != 0:
                return
            extra = {} if core_encoder is None else {"encoder": core_encoder.backbone.state_dict()}
            save_checkpoint(
                checkpoint_path,
                {
                    **extra,
                    "model": core.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "vocab": vocab.to_dict(),
                    "fingerprint": fingerprint,
                    "finished": finished,
                    **state,
                },
            )

        if rank == 0:
            _notify(
                callbacks,
                "on_train_start",
                {
                    "params": params,
                    "out_dir": str(out_dir),
                    "vocab": vocab,
                    "vocab_size": len(vocab),
                    "train_images": len(train_data.image_ids),
                    "train_pairs": len(train_data),
                    "val_images": len(val_data.image_ids),
                    "steps_per_epoch": steps_per_epoch,
                    "parameters": sum(p.numel() for p in core.parameters()),
                    "device": str(device),
                    "precision": str(dtype or torch.float32).removeprefix("torch."),
                    "finetune_blocks": finetune,
                    "encoder_trainable_parameters": sum(p.numel() for group in groups for p in group["params"]),
                    "world_size": world,
                    "resumed_from": None
                    if checkpoint is None
                    else {"epoch": state["epoch"], "batch": state["batch"], "step": state["step"]},
                    "val_examples": [
                        {"image_id": r.image_id, "path": r.path, "references": list(r.captions)}
                        for r in val_records[:8]
                    ],
                },
            )

        stop = state["bad_epochs"] >= patience
        while state["epoch"] < epochs + scst_epochs:
            if stop:
                if phase["scst"] or state["epoch"] > epochs or not scst_epochs:
                    break
                # Early stopping ends the cross-entropy phase; the self-critical epochs still run.
                state.update(epoch=epochs, bad_epochs=0)
                stop = False
            epoch = state["epoch"]
            if epoch >= epochs:
                if not phase["scst"]:
                    starting = state["batch"] == 0 and epoch == epochs
                    cider = _enter_scst(
                        core, optimizer, phase, package_dir, train_data, frequencies, starting, scst_factor
                    )
                    if starting:
                        # Patience counts anew: the cross-entropy epochs' misses do not stop this phase.
                        state["bad_epochs"] = 0
                # Batches of images, each sampled scst_samples times: about batch_size captions a step.
                order = torch.randperm(len(train_data.image_ids), generator=torch.Generator().manual_seed(seed + epoch))
                # Every rank gets as many batches (the gradients are averaged across ranks at each step).
                order = order.tolist()[: len(order) - len(order) % world][rank::world]
                step_images = max(1, batch_size // scst_samples)
                batches = [order[i : i + step_images] for i in range(0, len(order), step_images)]
            else:
                sampler.set_epoch(epoch)
                order = list(sampler)
                batches = [order[i : i + step_items] for i in range(0, len(order), step_items)]
                if per_image:
                    # Each batch of images as its pairs: k adjacent captions per image.
                    captions = train_data.captions_per_image(per_image, seed + epoch)
                    batches = [captions[images].reshape(-1).tolist() for images in batches]
            model.train()
            pixels = None
            if encoder is not None:
                encoder.train()  # only the fine-tuned stages: the Encoder keeps frozen parts in eval mode
                augment_seed = f"{seed}:{epoch}" if train_p.get("augment") else None
                keys = pair_keys(train_data, batches[state["batch"] :], augment_seed)
                pixels = iter(image_loader(train_data.paths, keys, core_encoder.image_size, workers, device))
            label = f"{'self-critical ' if phase['scst'] else ''}epoch {epoch + 1}/{epochs + scst_epochs}"
            bar = tqdm(total=len(batches), initial=state["batch"], desc=label, disable=not progress, leave=False)
            data_time, epoch_start, seen = 0.0, time.perf_counter(), 0
            for index in range(state["batch"], len(batches)):
                tick = time.perf_counter()
                if phase["scst"]:
                    feats = train_data.image_features(batches[index], device)
                    data_time += time.perf_counter() - tick
                    value, reward = scst_step(
                        core,
                        optimizer,
                        scheduler,
                        feats,
                        batches[index],
                        cider,
                        scst_samples,
                        int(decoding_p.get("max_length", 20)),
                        grad_clip,
                        scst_top_k,
                    )
                    state["reward_sum"] += reward if math.isfinite(value) else 0.0
                elif pixels is None:
                    feats, tokens = train_data.batch(batches[index], device, max(1, per_image))
                else:
                    feats = next(pixels).to(device, non_blocking=True)
                    tokens = train_data.batch_tokens(batches[index], device)
                if not phase["scst"]:
                    data_time += time.perf_counter() - tick
                    value = training_step(
                        model,
                        optimizer,
                        scheduler,
                        scaler,
                        feats,
                        tokens,
                        label_smoothing,
                        alpha_c,
                        grad_clip,
                        encoder,
                        dtype,
                    )
                state["step"] += 1
                state["batch"] = index + 1
                _count_loss(state, value)
                # Captions: in self-critical epochs every image of the batch is sampled scst_samples times.
                seen += len(batches[index]) * (scst_samples if phase["scst"] else 1)
                rate = seen * world / max(1e-9, time.perf_counter() - epoch_start)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", cap_s=f"{rate:.0f}")
                if rank == 0:
                    _notify(callbacks, "on_batch_end", state["step"], value)
                if checkpoint_every > 0 and state["step"] % checkpoint_every == 0 and state["batch"] < len(batches):
                    write_checkpoint()
            bar.close()
            _check_epoch(state, epoch, core, core_encoder)
            elapsed = time.perf_counter() - epoch_start
            metrics: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": state["step"],
                "skipped_steps": state["skipped"],
                "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
                "lr": optimizer.param_groups[0]["lr"],
                "captions_per_s": seen * world / max(1e-9, elapsed),
                "data_time_share": data_time / max(1e-9, elapsed),
            }
            if phase["scst"]:
                metrics["train_reward"] = state["reward_sum"] / max(1, state["loss_count"])
            improved = False
            if rank == 0:
                if core_encoder is not None:
                    # The val images through the encoder as trained so far, never the frozen cache.
                    val_data.features = encode_images(core_encoder, val_data.paths, batch_size, workers, device)
                val = validate(
                    core,
                    vocab,
                    val_data,
                    references,
                    {**decoding_p, "beam_size": train_p.get("val_beam_size", 1)},
                    device,
                )
                samples = val.pop("samples")
                metrics.update(val)
                if not math.isfinite(metrics["val_loss"]):
                    # Finite but huge weights can still give NaN outputs: such a model is never packaged.
                    raise TrainingError(
                        f"after epoch {epoch + 1} the validation loss is {metrics['val_loss']}: "
                        "training diverged; lower train.lr"
                    )
                improved = not state["best"] or metrics["val_CIDEr"] > state["best"]["val_CIDEr"]
                if improved:
                    state["best"] = dict(metrics)
                    save_package(
                        package_dir,
                        core,
                        vocab,
                        _package_config(params, feature_dim, metrics),
                        encoder=core_encoder,
                        frequencies=frequencies,
                        memory=memory,
                    )
                logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
                metrics_with_samples = {**metrics, "samples": samples}
                _notify(callbacks, "on_epoch_end", epoch + 1, metrics_with_samples)
            improved = _broadcast_flag(improved, device)
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["history"].append(metrics)
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_count=0, reward_sum=0.0, skipped=0)
            stop = state["bad_epochs"] >= patience
            finished = state["epoch"] >= epochs + scst_epochs or (stop and (phase["scst"] or not scst_epochs))
            write_checkpoint(finished=finished)
            _barrier()

        if world > 1:
            _record_rank_digests(core, device, out_dir, rank, world)
        result = TrainResult(package_dir, state["best"], state["history"])
        if rank == 0:
            _notify(callbacks, "on_train_end", result)
        return result
    except BaseException as error:
        if _rank() == 0:
            _notify(callbacks, "on_train_failed", error)
        raise
    finally:
        if started_dist:
            dist.destroy_process_group()
        if threads > 0:
            torch.set_num_threads(previous_threads)


def _count_loss(state: dict, value: float) -> None:
    """Add a step's loss to the epoch's mean; a skipped (non-finite) step is counted apart,
    and too many in a row stop training rather than spin on a model beyond repair."""
    if math.isfinite(value):
        state["loss_sum"] += value
        state["loss_count"] += 1
        state["nonfinite_run"] = 0
        return
    state["skipped"] += 1
    state["nonfinite_run"] += 1
    if state["nonfinite_run"] >= MAX_NONFINITE_STEPS:
        raise TrainingError(
            f"the loss was NaN or inf in {state['nonfinite_run']} steps in a row (up to step {state['step']}): "
            "training diverged; lower train.lr"
        )


def _check_epoch(state: dict, epoch: int, core, encoder) -> None:
    """Stop before validating or packaging a model whose weights are no longer numbers,
    or an epoch in which no step could be taken."""
    broken = _nonfinite_weights(core, encoder)
    if broken:
        raise TrainingError(
            f"after epoch {epoch + 1}, {len(broken)} weight tensors hold NaN or inf (first: {broken[0]}): "
            "training diverged; lower train.lr"
        )
    if state["skipped"] and not state["loss_count"]:
        raise TrainingError(
            f"every step of epoch {epoch + 1} had a NaN or inf loss ({state['skipped']} skipped): "
            "training diverged; lower train.lr"
        )


def _enter_scst(
    core,
    optimizer,
    phase: dict,
    package_dir: Path,
    train_data: CaptionData,
    frequencies,
    starting: bool,
    lr_scale: float,
):
    """Switch to self-critical training; returns the CIDEr-D reward over the training references.

    On the first self-critical step the decoder restarts from the best cross-entropy model
    (the package), which the validation CIDEr chose; a resumed run keeps its checkpoint's weights.
    """
    from captioning.cider import CiderD
    from captioning.package import load_package
    from captioning.scst import references_from_pairs

    if starting and (package_dir / "weights.pt").is_file():
        best, _, _ = load_package(package_dir)
        core.load_state_dict(best.state_dict())
    phase["scst"] = True
    if starting:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale
    references = references_from_pairs(train_data.rows, train_data.tokens, len(train_data.image_ids))
    return CiderD(references, frequencies)


def _ngram_frequencies(train_data: CaptionData):
    """Document frequencies of the training captions' n-grams (packaged for consensus reranking)."""
    from captioning.cider import NgramFrequencies
    from captioning.scst import references_from_pairs

    return NgramFrequencies.of(references_from_pairs(train_data.rows, train_data.tokens, len(train_data.image_ids)))


def _caption_memory(train_data: CaptionData):
    """The training images' pooled features and captions (packaged for reranking with the
    captions of an image's nearest training images); None when training reads image files."""
    from captioning.neighbours import CaptionMemory, pool
    from captioning.scst import references_from_pairs
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


def _package_config(params: dict, feature_dim: int, metrics: dict) -> dict[str, Any]:
    data_p = params.get("data") or {}
    return {
        "model": dict(params.get("model") or {}),
        "encoder": (params.get("features") or {}).get("encoder", "lite0"),
        "feature_dim": feature_dim,
        "decoding": dict(params.get("decoding") or {}),
        "vocab": dict(params.get("vocab") or {}),
        "data": {"train_query": data_p.get("train_query"), "val_query": data_p.get("val_query")},
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
