"""The decoding options a caption request may set, and their limits."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from captioning.serving.errors import InputError

OPTION_LIMITS = {"beam_size": (1, 10), "max_length": (1, 60)}
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def option_field(name: str, default: int | None = None):
    """A pydantic field for a decoding option with the API's limits (the model service checks them again)."""
    low, high = OPTION_LIMITS[name]
    return Field(default, ge=low, le=high)


def parse_option(name: str, raw: str | None, default: Any) -> Any:
    """One option from its form or query text; missing or blank gives `default`."""
    if raw is None or str(raw).strip() == "":
        return default
    raw = str(raw).strip()
    if name == "return_attention":
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise InputError(400, "bad_option", f"return_attention must be true or false, got {raw!r}")
    low, high = OPTION_LIMITS[name]
    try:
        value = int(raw)
    except ValueError:
        raise InputError(400, "bad_option", f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise InputError(400, "bad_option", f"{name} must be between {low} and {high}, got {value}")
    return value


def decoding_options(fields: dict[str, str]) -> dict[str, Any]:
    """The options of a request (None: the package's decoding defaults)."""
    return {
        "beam_size": parse_option("beam_size", fields.get("beam_size"), None),
        "max_length": parse_option("max_length", fields.get("max_length"), None),
        "return_attention": parse_option("return_attention", fields.get("return_attention"), False),
    }
