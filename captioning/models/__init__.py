"""Caption decoders behind one interface (`CaptionModel`) and the factory that builds them."""

from __future__ import annotations

from typing import Any

from captioning.models.attention import SoftAttention
from captioning.models.base import CaptionModel, State
from captioning.models.ensemble import Ensemble
from captioning.models.precision import bfloat16_products, quantize_int8
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
    "ensemble_config",
    "bfloat16_products",
    "quantize_int8",
]


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
