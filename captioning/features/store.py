"""The feature cache: encoder outputs for every image, computed once.

A store is a folder with one raw float16 array (`features.f16`, images x positions x
channels, memory-mapped when read) and `index.json` (encoder, shape, image ids in row
order). New images are appended; the index is rewritten atomically after the rows are
on disk, so an interrupted run keeps every batch it finished and re-running does only
the missing work. Several processes fill one store by shards (`build_shard`, then
`merge_shards`): see "sharded building" below.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import ImageOps

from captioning.images import ImageError, open_image, to_tensor

DATA_FILE = "features.f16"
INDEX_FILE = "index.json"


class FeatureStore:
    """Cached spatial features of one encoder for the images of one dataset."""

    def __init__(self, root: str | Path, encoder: str, positions: int, dim: int):
        self.root = Path(root)
        self.encoder = encoder
        self.positions = positions
        self.dim = dim
        self.ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._array: np.memmap | None = None

    # ---- opening -------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        """An existing store (FileNotFoundError when the folder holds none)."""
        root = Path(root)
        index_path = root / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"no feature store in {root} (missing {INDEX_FILE})")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        store = cls(root, index["encoder"], index["positions"], index["dim"])
        store.ids = list(index["ids"])
        store._rows = {image_id: row for row, image_id in enumerate(store.ids)}
        store._drop_unindexed_rows()
        return store

    @classmethod
    def open_or_create(cls, root: str | Path, encoder: str, positions: int, dim: int) -> "FeatureStore":
        root = Path(root)
        if (root / INDEX_FILE).is_file():
            store = cls.open(root)
            if (store.encoder, store.positions, store.dim) != (encoder, positions, dim):
                raise ValueError(
                    f"feature store {root} holds {store.encoder} features "
                    f"({store.positions}x{store.dim}), not {encoder} ({positions}x{dim})"
                )
            return store
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, encoder, positions, dim)
        (root / DATA_FILE).touch()
        store._write_index()
        return store

    # ---- reading -------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    def rows(self, image_ids: Iterable[str]) -> np.ndarray:
        """Row numbers of the given ids (KeyError names the first unknown one)."""
        result = []
        for image_id in image_ids:
            if image_id not in self._rows:
                raise KeyError(f"image {image_id!r} is not in the feature store {self.root}")
            result.append(self._rows[image_id])
        return np.asarray(result, dtype=np.int64)

    @property
    def array(self) -> np.ndarray:
        """All features, (images, positions, dim) float16, memory-mapped read-only."""
        if self._array is None or self._array.shape[0] != len(self.ids):
            shape = (len(self.ids), self.positions, self.dim)
            if len(self.ids) == 0:
                return np.zeros(shape, dtype=np.float16)
            self._array = np.memmap(self.root / DATA_FILE, dtype=np.float16, mode="r", shape=shape)
        return self._array

    def get(self, image_ids: Sequence[str]) -> np.ndarray:
        """Features of the given images, (B, positions, dim) float16."""
        return np.asarray(self.array[self.rows(image_ids)])

    # ---- writing -------------------------------------------------------
    def append(self, image_ids: Sequence[str], features: np.ndarray) -> None:
        """Add rows for new images; the index names them only once the data is on disk."""
        features = np.ascontiguousarray(features, dtype=np.float16)
        if features.shape != (len(image_ids), self.positions, self.dim):
            raise ValueError(f"features of shape {features.shape} do not fit this store")
        duplicates = [image_id for image_id in image_ids if image_id in self._rows]
        if duplicates or len(set(image_ids)) != len(image_ids):
            raise ValueError(f"images already stored or repeated: {duplicates[:3]}")
        with open(self.root / DATA_FILE, "ab") as handle:
            handle.write(features.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        for image_id in image_ids:
            self._rows[image_id] = len(self.ids)
            self.ids.append(image_id)
        self._array = None

    def flush(self) -> None:
        self._write_index()

    def _write_index(self) -> None:
        index = {"encoder": self.encoder, "positions": self.positions, "dim": self.dim, "ids": self.ids}
        tmp = self.root / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index), encoding="utf-8")
        os.replace(tmp, self.root / INDEX_FILE)

    def _drop_unindexed_rows(self) -> None:
        """Rows written after the last index update (an interrupted run) are discarded."""
        path = self.root / DATA_FILE
        row_bytes = self.positions * self.dim * 2
        expected = len(self.ids) * row_bytes
        size = path.stat().st_size if path.exists() else 0
        if size < expected:
            raise ValueError(f"feature store {self.root} is damaged: {DATA_FILE} is shorter than its index")
        if size > expected:
            os.truncate(path, expected)


class _ImageFiles:
    """Decodes images for the DataLoader workers; failures travel back as messages."""

    def __init__(self, paths: list[str], size: int, flip: bool = False):
        self.paths = paths
        self.size = size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch

        try:
            image = open_image(self.paths[index])
            return index, to_tensor(ImageOps.mirror(image) if self.flip else image, self.size), ""
        except ImageError as error:
            return index, torch.zeros(3, self.size, self.size), str(error)


def build_features(
    records: Iterable,
    encoder_name: str,
    store_dir: str | Path,
    batch_size: int = 32,
    progress: bool = True,
    num_workers: int | None = None,
    weights: str | Path | None = None,
    flip: bool = False,
) -> FeatureStore:
    """Encode the images of `records` that the store does not hold yet.

    Re-running with the same images and encoder does no work (not even loading the
    encoder). A corrupt image stops the run with an ImageError naming the file; the
    batches encoded before it stay stored. `weights`: other encoder weights than the
    pretrained ones (a package's encoder.pt); the store then records `<encoder>-<fingerprint>`
    and refuses to mix them with any other encoder's features. `flip`: features of the images
    mirrored left to right (the store records `<key>-flip`), for decoding with `decoding.flip`.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from captioning.config import get_device
    from captioning.features.encoder import ENCODERS, build_encoder, encoder_key

    spec = ENCODERS[encoder_name] if encoder_name in ENCODERS else None
    if spec is None:
        raise KeyError(f"unknown encoder {encoder_name!r}; known: {', '.join(sorted(ENCODERS))}")
    key = encoder_key(encoder_name, weights) + ("-flip" if flip else "")
    store = FeatureStore.open_or_create(store_dir, key, spec.grid * spec.grid, spec.feature_dim)
    todo: dict[str, str] = {}
    for record in records:
        if record.image_id not in store and record.image_id not in todo:
            todo[record.image_id] = record.path
    if not todo:
        return store

    device = get_device()
    encoder = build_encoder(encoder_name, weights).optimize_for_inference().to(device)
    ids, paths = list(todo), list(todo.values())
    if num_workers is None:
        # JPEG decoding in one or two worker processes overlaps with the encoder.
        num_workers = 0 if len(paths) <= batch_size else min(2, os.cpu_count() or 1)
    loader = DataLoader(
        _ImageFiles(paths, spec.image_size, flip),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    last_flush = time.monotonic()
    bar = tqdm(total=len(ids), desc=f"features {key}", unit="img", disable=not progress)
    try:
        with torch.inference_mode():
            for indices, pixels, errors in loader:
                good = [n for n, message in enumerate(errors) if not message]
                if good:
                    features = encoder(pixels[good].to(device, non_blocking=True))
                    store.append([ids[int(indices[n])] for n in good], features.float().cpu().numpy())
                    bar.update(len(good))
                if len(good) < len(errors):
                    # The message names the file (open_image does); everything before it is kept.
                    raise ImageError(next(message for message in errors if message))
                if time.monotonic() - last_flush > 10:
                    store.flush()
                    last_flush = time.monotonic()
    finally:
        store.flush()
        bar.close()
    return store


def default_store_dir(encoder_name: str, dataset: str) -> Path:
    """artifacts_dir()/features/<encoder>/<dataset>; `encoder_name` may be an encoder key
    (`lite0-<fingerprint>` for a fine-tuned encoder, see captioning.features.encoder.encoder_key)."""
    from captioning.config import artifacts_dir

    return artifacts_dir() / "features" / encoder_name / dataset


def store_dir(encoder_name: str, dataset: str, root: str | Path | None = None) -> Path:
    """The store of one dataset's features: `root`/<encoder>/<dataset> (params features.dir),
    else the default under artifacts_dir()."""
    return Path(root) / encoder_name / dataset if root else default_store_dir(encoder_name, dataset)


def build_selection_features(
    records_by_dataset: dict[str, list],
    encoder_name: str,
    root: str | Path | None = None,
    batch_size: int = 32,
    progress: bool = True,
    num_workers: int | None = None,
) -> dict[str, tuple[FeatureStore, int]]:
    """Fill the store of every dataset of a selection (an image id is unique only within its
    dataset, so each has its own); returns dataset -> (store, images newly encoded)."""
    result = {}
    for dataset, records in records_by_dataset.items():
        folder = store_dir(encoder_name, dataset, root)
        before = len(FeatureStore.open(folder)) if (folder / INDEX_FILE).is_file() else 0
        store = build_features(records, encoder_name, folder, batch_size, progress, num_workers)
        result[dataset] = (store, len(store) - before)
    return result


# --------------------------------------------------------------------------- sharded building
#
# Several processes (or machines sharing the folder) fill one store: each shard of the images
# the store lacks is encoded into a store of its own, <store>/shards/<k>-of-<n>-<digest>/, and
# merge_shards() then appends the finished shards' rows to the store under a lock. A shard that
# finished (its done.json) is never redone; a killed one resumes from its last flushed batch.

SHARDS_DIR = "shards"
SHARD_DONE = "done.json"
SHARD_LOCK = "owner.lock"
MERGE_CHUNK = 1024  # rows copied from a shard at a time


def plan_shards(records: Iterable, store_dir: str | Path, shards: int) -> list[list]:
    """The records of the images the store lacks, one per image, in image-id order, dealt into
    `shards` contiguous parts (sizes differ by one at most). Every shard computes the same plan
    from the same store, so shards need not talk to each other."""
    if shards < 1:
        raise ValueError(f"shards must be 1 or more, not {shards}")
    index = Path(store_dir) / INDEX_FILE
    stored = set(FeatureStore.open(store_dir).ids) if index.is_file() else set()
    todo: dict[str, Any] = {}
    for record in records:
        if record.image_id not in stored:
            todo.setdefault(record.image_id, record)
    ordered = [todo[image_id] for image_id in sorted(todo)]
    size, extra = divmod(len(ordered), shards)
    bounds = [k * size + min(k, extra) for k in range(shards + 1)]
    return [ordered[bounds[k] : bounds[k + 1]] for k in range(shards)]


def shard_dir(store_dir: str | Path, shard: int, shards: int, image_ids: Sequence[str]) -> Path:
    """<store>/shards/<k>-of-<n>-<digest of the shard's image ids>: another plan, another folder."""
    digest = hashlib.sha256("\n".join(image_ids).encode()).hexdigest()[:10]
    return Path(store_dir) / SHARDS_DIR / f"{shard}-of-{shards}-{digest}"


@contextlib.contextmanager
def _locked_folder(folder: Path):
    """An exclusive flock on the folder itself (no lock file left behind) for the duration."""
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive flock on `path` (holding this process's id) for the duration: one writer at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_shard(
    records: Iterable,
    encoder_name: str,
    store_dir: str | Path,
    shard: int,
    shards: int,
    batch_size: int = 32,
    num_workers: int | None = 0,
) -> dict[str, Any]:
    """Encode shard `shard` (0-based) of `shards` of the images the store at `store_dir` lacks.

    Returns {shard, folder, images, encoded, reused, pid, seconds}; `reused`: the shard had
    finished before (nothing encoded). Two runs of one shard never write at once (a lock file).
    """
    started = time.monotonic()
    part = plan_shards(records, store_dir, shards)[shard]
    folder = shard_dir(store_dir, shard, shards, [record.image_id for record in part])
    summary = {"shard": shard, "folder": str(folder), "images": len(part), "pid": os.getpid()}
    with _exclusive(folder / SHARD_LOCK):
        if (folder / SHARD_DONE).is_file():
            return {**summary, "encoded": 0, "reused": True, "seconds": 0.0}
        before = len(FeatureStore.open(folder)) if (folder / INDEX_FILE).is_file() else 0
        store = build_features(part, encoder_name, folder, batch_size, progress=False, num_workers=num_workers)
        summary.update(encoded=len(store) - before, reused=False, seconds=round(time.monotonic() - started, 2))
        tmp = folder / (SHARD_DONE + ".tmp")
        tmp.write_text(json.dumps(summary), encoding="utf-8")
        os.replace(tmp, folder / SHARD_DONE)
    return summary


def merge_shards(store_dir: str | Path) -> int:
    """Append the rows of every finished shard that the store lacks (shards in name order), then
    remove those shards; returns the rows added. Unfinished shards stay. Merges are serialised by
    a lock on the store folder; the index names new rows only once they are on disk."""
    store_dir = Path(store_dir)
    added = 0
    with _locked_folder(store_dir):
        for folder in sorted(path.parent for path in (store_dir / SHARDS_DIR).glob(f"*/{SHARD_DONE}")):
            shard = FeatureStore.open(folder)
            store = FeatureStore.open_or_create(store_dir, shard.encoder, shard.positions, shard.dim)
            new = [image_id for image_id in shard.ids if image_id not in store]
            for start in range(0, len(new), MERGE_CHUNK):  # a chunk in memory at a time
                chunk = new[start : start + MERGE_CHUNK]
                store.append(chunk, shard.get(chunk))
            store.flush()
            added += len(new)
            shutil.rmtree(folder)
        with contextlib.suppress(OSError):  # only when no unfinished shard is left
            (store_dir / SHARDS_DIR).rmdir()
    return added
