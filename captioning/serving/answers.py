"""What the services answer: plain JSON from the model service, the public answer of the API."""

from __future__ import annotations

from typing import Any


def jsonable(value: Any) -> Any:
    """Tensors and numpy arrays to plain lists, so every answer is JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float):
        return round(value, 6)
    return value


def public_answer(result: dict, return_attention: bool) -> dict:
    """What the API answers for one caption of the model service."""
    answer = {
        "caption": result["caption"],
        "alternatives": [
            {"caption": alt["caption"], "log_prob": alt["log_prob"]} for alt in result.get("alternatives", [])
        ],
        "model_version": result["model_version"],
    }
    if return_attention and result.get("attention") is not None:
        answer["attention"] = result["attention"]
    return answer
