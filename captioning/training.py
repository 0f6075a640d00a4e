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
DistributedSampler, and rank 0 alone writing files and calling callbacks.
"""

from __future__ import annotations

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
PACKAGE_DIR = "model"
# Cached features up to this size are copied into memory; larger caches are read from the memory map.
PRELOAD_LIMIT_BYTES = 2 << 30
# Keys that may change between a run and its resumption without changing the result.
_RESUME_NEUTRAL = {"train": {"progress", "checkpoint_every", "threads"}, "features": {"dir", "workers", "batch_size"}}
# Settings that do nothing while the encoder is frozen (finetune_blocks 0).
_FINETUNE_KEYS = ("finetune_blocks", "encoder_lr", "augment")
# Random resized crop for fine-tuning: area share and aspect ratio range. Mild, because
# captions speak about the whole picture ("two dogs on the grass").
CROP_AREA = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


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
    row n = image n) or the store's memory map, indexed through `store_rows`; None when
    training reads the image files (`paths`, image n = paths[n]) instead.
    """

    features: Any
    store_rows: np.ndarray | None  # image n -> row in the memory map (None when preloaded)
    rows: np.ndarray  # (P,) image index per pair
    tokens: torch.Tensor  # (P, L) BOS ... EOS PAD..., int64
    image_ids: list[str]
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def image_features(self, images, device) -> torch.Tensor:
        """Float32 features (B, N, C) of images given by index."""
        images = np.asarray(images, dtype=np.int64)
        if self.store_rows is None:
            feats = self.features[torch.from_numpy(images)]
        else:
            feats = torch.from_numpy(np.asarray(self.features[self.store_rows[images]]))
        return feats.to(device).float()

    def batch_tokens(self, indices, device) -> torch.Tensor:
        tokens = self.tokens[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
        # Trailing all-PAD columns carry nothing: trim them for speed.
        length = int((tokens != 0).sum(1).max())
        return tokens[:, :length].to(device)

    def batch(self, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        return self.image_features(self.rows[indices], device), self.batch_tokens(indices, device)


def encode_captions(vocab, captions: list[str], max_length: int) -> torch.Tensor:
    """Captions -> (n, max_length + 2) int64: BOS, tokens, EOS, then PAD (0)."""
    from captioning.vocab import BOS, EOS

    out = torch.zeros(len(captions), max_length + 2, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = [BOS, *vocab.encode(caption, max_length), EOS]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def caption_data(records, store, vocab, max_length: int, preload: bool = True) -> CaptionData:
    """All (image, caption) pairs of `records`, features taken from `store` (None: images are read instead)."""
    image_ids = list(dict.fromkeys(record.image_id for record in records))
    local = {image_id: n for n, image_id in enumerate(image_ids)}
    paths = {record.image_id: str(record.path) for record in records}
    rows, captions = [], []
    for record in records:
        for caption in record.captions:
            rows.append(local[record.image_id])
            captions.append(caption)
    features: Any = None
    store_rows = None
    if store is not None:
        store_rows = store.rows(image_ids)
        size = len(image_ids) * store.positions * store.dim * 2
        if preload and size <= PRELOAD_LIMIT_BYTES:
            features = torch.from_numpy(np.ascontiguousarray(store.array[store_rows]))
            store_rows = None
        else:
            features = store.array
    tokens = encode_captions(vocab, captions, max_length)
    return CaptionData(features, store_rows, np.asarray(rows, dtype=np.int64), tokens, image_ids,
                       [paths[image_id] for image_id in image_ids])


def load_split(query_text: str, features_params: dict, batch_size: int, progress: bool, rank: int,
               cache: bool = True):
    """(records, feature store) for a data query; rank 0 fills the cache first.

    cache=False (fine-tuning reads the images): (records, None), no encoding.
    """
    from captioning.data.query import parse_query, select
    from captioning.features import build_features, default_store_dir

    query = parse_query(query_text)
    records = select(query)
    if not records:
        raise TrainingError(f"data query {query_text!r} selects no records")
    if not cache:
        return records, None
    encoder = features_params.get("encoder", "lite0")
    root = features_params.get("dir")
    store_dir = Path(root) / encoder / query.dataset if root else default_store_dir(encoder, query.dataset)
    if rank == 0:
        build_features(records, encoder, store_dir, features_params.get("batch_size", batch_size), progress,
                       num_workers=features_params.get("workers"))
    _barrier()
    store = build_features(records, encoder, store_dir, batch_size, progress=False)  # no work: all cached
    return records, store


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
    return [[(int(data.rows[i]), None if augment_seed is None else f"{augment_seed}:{i}") for i in batch]
            for batch in batches]


def image_loader(paths: list[str], keys: list[list[tuple]], size: int, workers: int,
                 device) -> torch.utils.data.DataLoader:
    """Pixel batches (B, 3, size, size), one per list of PairImages keys, in order."""
    return torch.utils.data.DataLoader(
        PairImages(paths, size), batch_sampler=keys, num_workers=workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # else the loader draws its seed from the global RNG
    )


def encode_images(encoder, paths: list[str], batch_size: int, workers: int, device) -> torch.Tensor:
    """Features (images, N, C) float16 of image files with the encoder as it is now, computed
    as a package computes them (a copy with folded batch norms)."""
    import copy

    frozen = copy.deepcopy(encoder).optimize_for_inference()
    keys = [[(n, None) for n in range(start, min(start + batch_size, len(paths)))]
            for start in range(0, len(paths), batch_size)]
    with torch.inference_mode():
        outputs = [frozen(pixels.to(device)).to(torch.float16).cpu()
                   for pixels in image_loader(paths, keys, encoder.image_size, workers, device)]
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
def validate(model, vocab, data: CaptionData, references: dict[str, list[str]], decoding: dict, device) -> dict[str, Any]:
    """Captions of the validation images scored against their references, plus the plain val loss."""
    model.eval()
    predictions: dict[str, str] = {}
    ids = data.image_ids
    for start in range(0, len(ids), 64):
        chunk = list(range(start, min(start + 64, len(ids))))
        captions = caption_batch(
            model, vocab, data.image_features(chunk, device), int(decoding.get("beam_size", 1)),
            int(decoding.get("max_length", 20)), float(decoding.get("length_penalty", 0.0)),
        )
        predictions.update(zip(ids[start: start + len(chunk)], captions))
    total, count = 0.0, 0
    for start in range(0, len(data), 256):
        feats, tokens = data.batch(range(start, min(start + 256, len(data))), device)
        logits, _ = model(feats, tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1),
                               ignore_index=0, reduction="sum")
        total += float(loss)
        count += int((tokens[:, 1:] != 0).sum())
    scores = quick_scores(predictions, {key: references[key] for key in predictions})
    return {
        "val_CIDEr": scores["CIDEr"], "val_BLEU-4": scores["BLEU-4"], "val_loss": total / max(1, count),
        "samples": dict(list(predictions.items())[:5]),
    }


def training_step(model, optimizer, scheduler, scaler, feats: torch.Tensor, tokens: torch.Tensor,
                  label_smoothing: float = 0.0, alpha_c: float = 0.0, grad_clip: float = 0.0,
                  encoder=None) -> float:
    """One optimisation step on a batch (teacher forcing); returns the caption loss.

    With an `encoder` (fine-tuning), `feats` are pixels that it encodes first.
    Mixed precision follows `scaler.is_enabled()` (CUDA only); the loss is computed in float32.
    """
    amp = scaler.is_enabled()
    with torch.autocast(feats.device.type, dtype=torch.float16, enabled=amp):
        if encoder is not None:
            feats = encoder(feats)
        logits, aux = model(feats, tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1),
                               ignore_index=0, label_smoothing=label_smoothing)
        total = loss + alpha_c * aux
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        # Every optimised parameter: the decoder's, and the encoder's trained stages when fine-tuning.
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- distributed helpers


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_flag(flag: bool, device) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, 0)
    return bool(tensor.item())


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


def train(params: dict[str, Any], callbacks: Iterable = (), out_dir: str | Path | None = None, resume: bool = True) -> TrainResult:
    """Train a caption model as `params` say; return where the best package is and the history.

    With `resume`, an existing out_dir/checkpoint.pt from the same params is continued
    (or, when that run has finished, its result is returned without training).
    """
    import torch.distributed as dist
    from tqdm import tqdm

    from captioning.config import artifacts_dir, get_device, use_mixed_precision
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

    threads = int(train_p.get("threads", 0) or 0)
    previous_threads = torch.get_num_threads()
    if threads > 0:
        # Small decoders on a busy CPU run far faster on one thread than on contended several.
        torch.set_num_threads(threads)
    started_dist = False
    if _distributed() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started_dist = True
    try:
        rank, world = _rank(), (dist.get_world_size() if dist.is_initialized() else 1)
        device = get_device()
        amp = use_mixed_precision(device)
        out_dir = Path(out_dir) if out_dir else artifacts_dir() / "train"
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
        encoder_name = feat_p.get("encoder", "lite0")
        train_records, train_store = load_split(data_p["train_query"], feat_p, batch_size, progress, rank,
                                                cache=not finetune)
        val_records, val_store = load_split(data_p["val_query"], feat_p, batch_size, progress, rank,
                                            cache=not finetune)
        val_limit = int(train_p.get("val_images", 500))
        if val_limit > 0:
            val_records = val_records[:val_limit]

        if checkpoint is not None:
            vocab = Vocabulary.from_dict(checkpoint["vocab"])
        else:
            captions = [caption for record in train_records for caption in record.captions]
            vocab = Vocabulary.build(captions, int(vocab_p.get("min_freq", 5)))
        max_length = int(vocab_p.get("max_length", 22))
        train_data = caption_data(train_records, train_store, vocab, max_length)
        val_data = caption_data(val_records, val_store, vocab, max_length)
        references = {record.image_id: list(record.captions) for record in val_records}

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
        optimizer = torch.optim.AdamW(
            [{"params": list(model.parameters())}, *groups],
            lr=float(train_p.get("lr", 5e-4)), weight_decay=float(train_p.get("weight_decay", 0.0)),
        )
        sampler = torch.utils.data.DistributedSampler(
            range(len(train_data)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        steps_per_epoch = math.ceil(len(sampler) / batch_size)
        epochs = int(train_p.get("epochs", 8))
        total_steps = epochs * steps_per_epoch
        warmup = int(train_p.get("warmup_steps", 0))
        schedule_name = str(train_p.get("schedule", "cosine"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, total_steps, schedule_name)
        )
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        label_smoothing = float(train_p.get("label_smoothing", 0.0))
        grad_clip = float(train_p.get("grad_clip", 0.0))
        alpha_c = float(train_p.get("alpha_c", 0.0))
        patience = int(train_p.get("patience", 3))
        checkpoint_every = int(train_p.get("checkpoint_every", 500))

        state = {"epoch": 0, "batch": 0, "step": 0, "best": {}, "bad_epochs": 0, "history": [],
                 "loss_sum": 0.0, "loss_count": 0}
        if checkpoint is not None:
            core.load_state_dict(checkpoint["model"])
            if core_encoder is not None:
                core_encoder.backbone.load_state_dict(checkpoint["encoder"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            state.update({key: checkpoint[key] for key in state})
            _set_rng_state(checkpoint["rng"])
            logger.info("resuming from %s at epoch %d batch %d", checkpoint_path, state["epoch"], state["batch"])

        def write_checkpoint(finished: bool = False) -> None:
            if rank != 0:
                return
            extra = {} if core_encoder is None else {"encoder": core_encoder.backbone.state_dict()}
            save_checkpoint(checkpoint_path, {
                **extra, "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                "vocab": vocab.to_dict(), "fingerprint": fingerprint, "finished": finished, **state,
            })

        if rank == 0:
            _notify(callbacks, "on_train_start", {
                "params": params, "out_dir": str(out_dir), "vocab": vocab, "vocab_size": len(vocab),
                "train_images": len(train_data.image_ids), "train_pairs": len(train_data),
                "val_images": len(val_data.image_ids), "steps_per_epoch": steps_per_epoch,
                "parameters": sum(p.numel() for p in core.parameters()), "device": str(device),
                "finetune_blocks": finetune,
                "encoder_trainable_parameters": sum(p.numel() for group in groups for p in group["params"]),
                "world_size": world, "resumed_from": None if checkpoint is None else
                {"epoch": state["epoch"], "batch": state["batch"], "step": state["step"]},
                "val_examples": [{"image_id": r.image_id, "path": r.path, "references": list(r.captions)}
                                 for r in val_records[:8]],
            })

        stop = state["bad_epochs"] >= patience
        while state["epoch"] < epochs and not stop:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            order = list(sampler)
            batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
            model.train()
            pixels = None
            if encoder is not None:
                encoder.train()  # only the fine-tuned stages: the Encoder keeps frozen parts in eval mode
                augment_seed = f"{seed}:{epoch}" if train_p.get("augment") else None
                keys = pair_keys(train_data, batches[state["batch"]:], augment_seed)
                pixels = iter(image_loader(train_data.paths, keys, core_encoder.image_size, workers, device))
            bar = tqdm(total=len(batches), initial=state["batch"], desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not progress, leave=False)
            data_time, epoch_start, seen = 0.0, time.perf_counter(), 0
            for index in range(state["batch"], len(batches)):
                tick = time.perf_counter()
                if pixels is None:
                    feats, tokens = train_data.batch(batches[index], device)
                else:
                    feats = next(pixels).to(device, non_blocking=True)
                    tokens = train_data.batch_tokens(batches[index], device)
                data_time += time.perf_counter() - tick
                value = training_step(model, optimizer, scheduler, scaler, feats, tokens, label_smoothing,
                                      alpha_c, grad_clip, encoder)
                state["step"] += 1
                state["batch"] = index + 1
                state["loss_sum"] += value
                state["loss_count"] += 1
                seen += len(batches[index])
                rate = seen * world / max(1e-9, time.perf_counter() - epoch_start)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", cap_s=f"{rate:.0f}")
                if rank == 0:
                    _notify(callbacks, "on_batch_end", state["step"], value)
                if checkpoint_every > 0 and state["step"] % checkpoint_every == 0 and state["batch"] < len(batches):
                    write_checkpoint()
            bar.close()
            elapsed = time.perf_counter() - epoch_start
            metrics: dict[str, Any] = {
                "epoch": epoch + 1, "step": state["step"],
                "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
                "lr": optimizer.param_groups[0]["lr"],
                "captions_per_s": seen * world / max(1e-9, elapsed),
                "data_time_share": data_time / max(1e-9, elapsed),
            }
            improved = False
            if rank == 0:
                if core_encoder is not None:
                    # The val images through the encoder as trained so far, never the frozen cache.
                    val_data.features = encode_images(core_encoder, val_data.paths, batch_size, workers, device)
                val = validate(core, vocab, val_data, references, {**decoding_p, "beam_size": train_p.get("val_beam_size", 1)}, device)
                samples = val.pop("samples")
                metrics.update(val)
                improved = not state["best"] or metrics["val_CIDEr"] > state["best"]["val_CIDEr"]
                if improved:
                    state["best"] = dict(metrics)
                    save_package(package_dir, core, vocab, _package_config(params, feature_dim, metrics),
                                 encoder=core_encoder)
                logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
                metrics_with_samples = {**metrics, "samples": samples}
                _notify(callbacks, "on_epoch_end", epoch + 1, metrics_with_samples)
            improved = _broadcast_flag(improved, device)
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["history"].append(metrics)
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_count=0)
            stop = state["bad_epochs"] >= patience
            write_checkpoint(finished=stop or state["epoch"] >= epochs)
            _barrier()

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
