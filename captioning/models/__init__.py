"""Caption decoders behind one interface (`CaptionModel`) and the factory that builds them."""

from __future__ import annotations

from typing import Any

from captioning.models.attention import SoftAttention
from captioning.models.base import CaptionModel, State
from captioning.models.ensemble import Ensemble
from captioning.models.show_tell import ShowTell
from captioning.models.transformer import TransformerCaptioner
from captioning.models.updown import UpDown

MODELS: dict[str, type[CaptionModel]] = {
    "show_tell": ShowTell,
    "attention": SoftAttention,
    "transformer": TransformerCaptioner,
    "updown": UpDown,
}

# Settings a config may leave out (the values of params.yaml's `model:` section).
DEFAULTS: dict[str, Any] = {
    "embed_dim": 256,
    "hidden_dim": 512,
    "attention_dim": 256,
    "dropout": 0.3,
    "layers": 2,
    "heads": 4,
    "ff_dim": 1024,
}
_SIZES = ("embed_dim", "hidden_dim", "attention_dim", "layers", "heads", "ff_dim")

__all__ = [
    "MODELS",
    "DEFAULTS",
    "CaptionModel",
    "Ensemble",
    "State",
    "build_model",
    "model_config",
    "member_configs",
    "ensemble_members",
    "ensemble_config",
]


# Sections a member of `model.ensemble` may override for itself.
MEMBER_SECTIONS = ("model", "train")


def ensemble_members(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The decoders a `model:` section trains, each as {"decoder", "model", "train", "config"} (the
    last its checked model config): first
    `decoder` with the section's settings, then each entry of `ensemble`. An entry is a decoder
    name, or a mapping with `decoder` and settings of the `model` and `train` sections that
    apply to that member alone, e.g. {decoder: transformer, train: {scst_epochs: 0}}."""
    extra = section.get("ensemble") or []
    if isinstance(extra, str) or not isinstance(extra, (list, tuple)):
        raise ValueError(f"model.ensemble must be a list of decoder names or mappings, got {extra!r}")
    members = [{"decoder": section.get("decoder"), "model": {}, "train": {}}]
    for entry in extra:
        if isinstance(entry, str):
            entry = {"decoder": entry}
        if not isinstance(entry, dict) or "decoder" not in entry:
            raise ValueError(
                f"a model.ensemble entry must be a decoder name or a mapping with `decoder`, got {entry!r}"
            )
        unknown = sorted(set(entry) - {"decoder", *MEMBER_SECTIONS})
        if unknown:
            raise ValueError(
                f"model.ensemble entry {entry!r}: unknown keys {unknown} "
                f"(a member may set only {', '.join(MEMBER_SECTIONS)})"
            )
        overrides = {name: entry.get(name) or {} for name in MEMBER_SECTIONS}
        if not all(isinstance(value, dict) for value in overrides.values()):
            raise ValueError(f"model.ensemble entry {entry!r}: {' and '.join(MEMBER_SECTIONS)} must be mappings")
        unknown = sorted(set(overrides["model"]) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"model.ensemble entry {entry!r}: unknown model settings {unknown}")
        members.append({"decoder": entry["decoder"], **overrides})
    for member in members:
        member["config"] = model_config({**section, **member["model"], "decoder": member["decoder"]})
    return members


def member_configs(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The checked model configs of `ensemble_members(section)`. One entry: a single model, no ensemble."""
    return [member["config"] for member in ensemble_members(section)]


def ensemble_config(members: list[dict[str, Any]]) -> dict[str, Any]:
    """The config of an Ensemble of models with these configs."""
    return model_config({"decoder": "ensemble", "members": list(members)})


def model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The complete, checked decoder settings from a `model:` section (unknown keys dropped)."""
    decoder = config.get("decoder")
    if decoder == "ensemble":
        members = config.get("members")
        if not isinstance(members, list) or len(members) < 2:
            raise ValueError("an ensemble config needs a list of at least two member configs")
        if any(isinstance(m, dict) and m.get("decoder") == "ensemble" for m in members):
            raise ValueError("an ensemble cannot contain an ensemble")
        return {"decoder": "ensemble", "members": [model_config(member) for member in members]}
    if decoder not in MODELS:
        raise ValueError(f"unknown decoder {decoder!r}; known decoders: {', '.join(sorted(MODELS))}")
    result: dict[str, Any] = {"decoder": decoder}
    for key, default in DEFAULTS.items():
        result[key] = config.get(key, default)
    for key in _SIZES:
        value = result[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
    result["dropout"] = float(result["dropout"])
    if not 0.0 <= result["dropout"] < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {result['dropout']}")
    if decoder == "transformer" and result["hidden_dim"] % result["heads"]:
        raise ValueError(
            f"model.hidden_dim ({result['hidden_dim']}) must be divisible by model.heads ({result['heads']})"
        )
    return result


def build_model(config: dict[str, Any], vocab_size: int, feature_dim: int) -> CaptionModel:
    """A new decoder for `config["decoder"]`; rebuild one with
    `build_model(model.config, model.vocab_size, model.feature_dim)`."""
    if vocab_size < 5:
        raise ValueError(f"vocab_size must cover the 4 special tokens and at least one word, got {vocab_size}")
    if feature_dim < 1:
        raise ValueError(f"feature_dim must be positive, got {feature_dim}")
    config = model_config(config)
    if config["decoder"] == "ensemble":
        members = [build_model(member, vocab_size, feature_dim) for member in config["members"]]
        return Ensemble(config, vocab_size, feature_dim, members)
    return MODELS[config["decoder"]](config, vocab_size, feature_dim)
