"""What a run keeps on disk between its steps: the checkpoint (weights, optimizer, RNG state,
progress), the fingerprint of the settings it may be resumed with, and the package's config."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioning.inference.model_package import load_checkpoint
from captioning.settings import Settings
from captioning.training.base import TrainingError

CHECKPOINT_FILE = "checkpoint.pt"
PACKAGE_DIR = "model"
# Keys that may change between a run and its resumption without changing the result.
RESUME_NEUTRAL = {"train": {"progress", "checkpoint_every", "threads"}, "features": {"dir", "workers", "batch_size"}}
# Settings that do nothing while the encoder is frozen (finetune_blocks 0).
FINETUNE_KEYS = ("finetune_blocks", "encoder_lr", "augment")
# Settings that do nothing without self-critical epochs (scst_epochs 0).
SCST_KEYS = ("scst_epochs", "scst_lr", "scst_samples", "scst_top_k")


def fingerprint(settings: Settings) -> str:
    """What must not change for a checkpoint to be resumed: the settings that shape the result.

    Settings that are off are left out, so a run keeps the fingerprint it had before they existed.
    """
    full = settings.to_dict()
    relevant = {key: dict(full[key]) for key in ("features", "vocab", "model", "train", "decoding")}
    relevant["data"] = {key: full["data"][key] for key in ("train_query", "val_query")}
    for section, keys in RESUME_NEUTRAL.items():
        for key in keys:
            relevant[section].pop(key, None)
    train, model = relevant["train"], relevant["model"]
    if not train["finetune_blocks"]:
        for key in FINETUNE_KEYS:
            train.pop(key)
    if not train["scst_epochs"]:
        for key in SCST_KEYS:
            train.pop(key)
    if train["precision"] == "auto":
        train.pop("precision")  # the device's default
    if not train["captions_per_image"]:
        train.pop("captions_per_image")  # 0: batches of captions
    if model["ensemble"]:
        model["ensemble"] = [_member_entry(entry) for entry in model["ensemble"]]
    else:
        model.pop("ensemble")  # a single decoder (or an ensemble's member)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _member_entry(entry) -> Any:
    """An ensemble entry as written in params.yaml: a name, or a mapping without empty sections."""
    if isinstance(entry, str):
        return entry
    return {key: value for key, value in entry.items() if key == "decoder" or value}


def read_checkpoint(path: Path, settings: Settings) -> dict[str, Any] | None:
    """The checkpoint at `path` when there is one, refused when other settings wrote it."""
    if not path.is_file():
        return None
    checkpoint = load_checkpoint(path)
    if checkpoint.get("fingerprint") != fingerprint(settings):
        raise TrainingError(
            f"{path} was written with other params; use another output folder or start afresh (--no-resume)"
        )
    return checkpoint


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def package_config(
    settings: Settings, feature_dim: int, metrics: dict[str, Any], model: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The package's config.json: the settings predict needs, and the metrics it was chosen by.
    `model`: the model config to store instead of the `model` settings (an ensemble's)."""
    return {
        "model": settings.model.to_dict() if model is None else model,
        "encoder": settings.features.encoder,
        "feature_dim": feature_dim,
        "decoding": settings.decoding.to_dict(),
        "vocab": settings.vocab.to_dict(),
        "data": {"train_query": settings.data.train_query, "val_query": settings.data.val_query},
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
