"""Trained models as folders, and training checkpoints.

A package is `config.json` (model section, encoder, decoding defaults, vocabulary
fingerprint, parameter shapes, format version), `vocab.json` and `weights.pt` (a plain
state dict). A model trained with a fine-tuned encoder also carries `encoder.pt` (the
whole backbone in timm's layout), named with its fingerprint in `encoder_weights`;
without it the package uses the pretrained encoder. `ngrams.json` holds the document
frequencies of the training captions' n-grams, which consensus reranking of a beam weighs
n-grams with (`decoding.rerank: consensus`), and `neighbours.npz` the training images'
pooled features and captions, the evidence that reranking can add from an image's nearest
training images (`decoding.rerank_neighbours`, see `captioning.inference.neighbours`).
`drift.npz` holds the statistics of the training images' features that the service compares
live photos with (`captioning.features.drift`; without it no drift is monitored). Loading
checks every piece against the others and refuses a mismatch with PackageError rather than running a model with
the wrong vocabulary, layers or encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from captioning.features.drift import DRIFT_FILE

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "weights.pt"
ENCODER_FILE = "encoder.pt"
NGRAMS_FILE = "ngrams.json"
MEMORY_FILE = "neighbours.npz"


class PackageError(ValueError):
    """A model package (or checkpoint) that is incomplete or inconsistent."""


def save_package(
    directory: str | Path,
    model: torch.nn.Module,
    vocab,
    config: dict[str, Any],
    encoder: torch.nn.Module | None = None,
    frequencies=None,
    memory=None,
    drift=None,
) -> Path:
    """Write a package folder (replacing an existing one only once the new one is complete).

    `config` holds at least `model` (the params section build_model takes) and
    `encoder`; `decoding` defaults and any other JSON-able keys (metrics, data) are kept.
    `encoder`: a fine-tuned Encoder whose weights the package carries (None: the pretrained one).
    `frequencies`: the training captions' NgramFrequencies, for consensus reranking.
    `memory`: the training images' CaptionMemory, for reranking with their captions.
    `drift`: the training images' DriftReference, for the service's drift monitor.
    """
    directory = Path(directory)
    if "model" not in config or "encoder" not in config:
        raise PackageError("package config needs 'model' and 'encoder' sections")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {key: value.detach().cpu().contiguous() for key, value in _unwrap(model).state_dict().items()}
    torch.save(state, tmp / WEIGHTS_FILE)
    (tmp / VOCAB_FILE).write_text(json.dumps(vocab.to_dict(), ensure_ascii=False), encoding="utf-8")
    full = dict(config)
    full.update(
        format_version=FORMAT_VERSION,
        vocab_size=len(vocab),
        vocab_fingerprint=vocab.fingerprint(),
        feature_dim=int(config.get("feature_dim") or _feature_dim(config["encoder"])),
        parameter_shapes={key: list(value.shape) for key, value in state.items()},
        weights_sha256=_sha256(tmp / WEIGHTS_FILE),
    )
    full.pop("encoder_weights", None)  # describes only the file written here
    full.pop("ngrams_sha256", None)
    full.pop("neighbours_sha256", None)
    full.pop("drift_sha256", None)
    if frequencies is not None:
        (tmp / NGRAMS_FILE).write_text(json.dumps(frequencies.to_dict(), separators=(",", ":")), encoding="utf-8")
        full["ngrams_sha256"] = _sha256(tmp / NGRAMS_FILE)
    if memory is not None:
        full["neighbours_sha256"] = _sha256(memory.save(tmp / MEMORY_FILE))
    if drift is not None:
        full["drift_sha256"] = _sha256(drift.save(tmp))
    if encoder is not None:
        full["encoder_weights"] = _save_encoder(_unwrap(encoder), tmp / ENCODER_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(full, indent=2, ensure_ascii=False), encoding="utf-8")
    _replace_dir(tmp, directory)
    return directory


def load_package(directory: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, vocabulary, config) from a package folder; PackageError on any mismatch."""
    from captioning.models import build_model
    from captioning.vocab import Vocabulary

    directory = Path(directory)
    config = read_config(directory)
    try:
        vocab = Vocabulary.from_dict(json.loads((directory / VOCAB_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PackageError(f"{directory / VOCAB_FILE} cannot be read: {error}") from None
    if vocab.fingerprint() != config.get("vocab_fingerprint"):
        raise PackageError(
            f"vocabulary in {directory} has fingerprint {vocab.fingerprint()}, but the model was "
            f"trained with {config.get('vocab_fingerprint')}: refusing a mismatched vocabulary"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise PackageError(f"{directory} has no {WEIGHTS_FILE}")
    if config.get("weights_sha256") and _sha256(weights) != config["weights_sha256"]:
        raise PackageError(f"{weights} does not match the checksum in {CONFIG_FILE} (corrupt or replaced)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors have many types; all mean the same here
        raise PackageError(f"{weights} cannot be loaded: {error}") from None
    try:
        model = build_model(config["model"], len(vocab), config["feature_dim"])
    except (KeyError, ValueError, TypeError) as error:
        raise PackageError(f"model section in {directory / CONFIG_FILE} is invalid: {error}") from None
    check_state(model, state, str(weights))
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    encoder_weights(directory, config)  # a fine-tuned encoder must be there, intact
    return model, vocab, config


def load_frequencies(directory: str | Path, config: dict[str, Any]):
    """The package's NgramFrequencies (checked against its checksum), or None when it has none."""
    from captioning.inference.cider import NgramFrequencies

    path = _checked_part(directory, config, "ngrams_sha256", NGRAMS_FILE)
    if path is None:
        return None
    try:
        return NgramFrequencies.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise PackageError(f"{path} cannot be read: {error}") from None


def load_memory(directory: str | Path, config: dict[str, Any]):
    """The package's CaptionMemory (checked against its checksum), or None when it has none."""
    from captioning.inference.neighbours import CaptionMemory, CaptionMemoryError

    path = _checked_part(directory, config, "neighbours_sha256", MEMORY_FILE)
    if path is None:
        return None
    try:
        return CaptionMemory.load(path)
    except CaptionMemoryError as error:
        raise PackageError(str(error)) from None


def load_drift(directory: str | Path, config: dict[str, Any]):
    """The package's DriftReference (checked against its checksum), or None when it has none
    (a package written without one: no drift monitoring)."""
    from captioning.features.drift import DriftReference, DriftReferenceError

    path = _checked_part(directory, config, "drift_sha256", DRIFT_FILE)
    if path is None:
        return None
    try:
        return DriftReference.load(path.parent)
    except DriftReferenceError as error:
        raise PackageError(str(error)) from None


def _checked_part(directory: str | Path, config: dict[str, Any], checksum: str, name: str) -> Path | None:
    """An optional part of the package, present and matching config[checksum]; None when it has none."""
    if not config.get(checksum):
        return None
    path = Path(directory) / name
    if not path.is_file() or _sha256(path) != config[checksum]:
        raise PackageError(f"{path} is missing or does not match the checksum in {CONFIG_FILE}")
    return path


def encoder_weights(directory: str | Path, config: dict[str, Any]) -> Path | None:
    """The package's fine-tuned encoder weights file, or None when it uses the pretrained encoder."""
    entry = config.get("encoder_weights")
    if not entry:
        return None
    path = Path(directory) / entry.get("file", ENCODER_FILE)
    if not path.is_file():
        raise PackageError(f"{directory} was trained with a fine-tuned encoder but has no {path.name}")
    if entry.get("sha256") and _sha256(path) != entry["sha256"]:
        raise PackageError(f"{path} does not match the checksum in {CONFIG_FILE} (corrupt or replaced)")
    return path


def check_package_files(directory: str | Path) -> dict[str, str]:
    """Every file of a package checked against the checksums its config records; returns
    each file's sha256. PackageError names the first part that is missing or differs."""
    directory = Path(directory)
    config = read_config(directory)
    recorded = {
        WEIGHTS_FILE: config.get("weights_sha256"),
        NGRAMS_FILE: config.get("ngrams_sha256"),
        MEMORY_FILE: config.get("neighbours_sha256"),
        DRIFT_FILE: config.get("drift_sha256"),
    }
    entry = config.get("encoder_weights")
    if entry:
        recorded[entry.get("file", ENCODER_FILE)] = entry.get("sha256")
    if not recorded[WEIGHTS_FILE]:
        raise PackageError(f"{directory / CONFIG_FILE} records no weights checksum")
    sums = {path.name: _sha256(path) for path in sorted(directory.iterdir()) if path.is_file()}
    for name, checksum in recorded.items():
        if checksum and sums.get(name) != checksum:
            raise PackageError(f"{directory / name} is missing or does not match the checksum in {CONFIG_FILE}")
    return sums


def package_digest(directory: str | Path) -> str:
    """One sha256 for the whole package: of its files' names and checksums, each file checked."""
    sums = check_package_files(directory)
    return hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in sorted(sums.items())).encode()).hexdigest()


def feature_key(config: dict[str, Any]) -> str:
    """The encoder identity a package's features must come from: the encoder name, or
    `<name>-<fingerprint>` when the package carries fine-tuned encoder weights."""
    entry = config.get("encoder_weights")
    return f"{config['encoder']}-{entry['fingerprint']}" if entry else config["encoder"]


def read_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise PackageError(f"{directory} is not a model package (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise PackageError(f"{path} is not valid JSON: {error}") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"{path} has format version {version}; this code reads {FORMAT_VERSION}")
    for key in ("model", "encoder", "vocab_fingerprint", "feature_dim"):
        if key not in config:
            raise PackageError(f"{path} lacks {key!r}")
    return config


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """PackageError naming the first differences between the weights and the architecture."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    problems = []
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing {missing[:3]}")
    if extra:
        problems.append(f"unexpected {extra[:3]}")
    shapes = [
        f"{key} {found[key]} vs {expected[key]}" for key in expected if key in found and found[key] != expected[key]
    ]
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:3]))
    if problems:
        raise PackageError(f"weights in {source} do not fit the architecture: " + ", ".join(problems))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically (tmp file, fsync, rename): a kill never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(checkpoint, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by save_checkpoint (tensors, numbers, strings, lists, dicts only)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise PackageError(f"checkpoint {path} cannot be loaded: {error}") from None


# --------------------------------------------------------------------------- helpers


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def _save_encoder(encoder: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Write the encoder's backbone (timm's key layout, as build_encoder loads it); its config entry."""
    from captioning.features.encoder import state_fingerprint

    if getattr(encoder, "channels_last", False):
        raise PackageError("an encoder optimised for inference (folded batch norms) cannot be packaged")
    state = {key: value.detach().cpu().contiguous() for key, value in encoder.backbone.state_dict().items()}
    torch.save(state, path)
    return {
        "file": path.name,
        "fingerprint": state_fingerprint(state),
        "sha256": _sha256(path),
        "trainable_blocks": int(getattr(encoder, "trainable_blocks", 0)),
    }


def _feature_dim(encoder: str) -> int:
    from captioning.features.encoder import ENCODERS

    if encoder not in ENCODERS:
        raise PackageError(f"unknown encoder {encoder!r}")
    return ENCODERS[encoder].feature_dim


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
