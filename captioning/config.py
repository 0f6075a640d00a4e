"""Settings shared by every step: where things live, params.yaml, the device.

Everything that depends on the environment is read here, so the rest of the
library takes plain arguments.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = PROJECT_ROOT / "params.yaml"

# Environment variables that keep Prefect, MLflow, DVC and BentoML from
# phoning home (they otherwise log errors or wait on time-outs offline).
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
}


def disable_telemetry() -> None:
    """Switch off the usage reporting of every tool the project drives."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def data_dir() -> Path:
    """Folder that holds acquired datasets (`data/`, or $CAPTIONING_DATA_DIR)."""
    return Path(os.environ.get("CAPTIONING_DATA_DIR", PROJECT_ROOT / "data")).resolve()


def mirror_dir() -> Path | None:
    """Local mirror of the official downloads ($CAPTIONING_MIRROR), if set."""
    value = os.environ.get("CAPTIONING_MIRROR")
    return Path(value).resolve() if value else None


def artifacts_dir() -> Path:
    """Folder for derived outputs: feature caches, checkpoints, models."""
    return Path(os.environ.get("CAPTIONING_ARTIFACTS_DIR", PROJECT_ROOT / "artifacts")).resolve()


def reports_dir() -> Path:
    return Path(os.environ.get("CAPTIONING_REPORTS_DIR", PROJECT_ROOT / "reports")).resolve()


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read params.yaml (or another file) as a plain dict."""
    path = Path(path) if path else PARAMS_FILE
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def override(params: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a copy."""
    result = copy.deepcopy(params)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return result


def get_device(prefer: str | None = None):
    """The one place that chooses where tensors live: CUDA when present, else CPU.

    `prefer` (or $CAPTIONING_DEVICE) forces a device such as "cpu" or "cuda:1".
    """
    import torch

    choice = prefer or os.environ.get("CAPTIONING_DEVICE")
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def autocast_dtype(device, precision: str = "auto"):
    """The dtype training's forward passes compute in under autocast, or None for float32.

    `auto`: float16 on CUDA (with a gradient scaler), float32 elsewhere. `bfloat16` runs on
    CUDA and on CPUs; it pays off on CPUs with bfloat16 instructions (AVX-512 BF16, AMX), where
    the decoders trained 1.3-1.9 times as fast (reports/BENCHMARKS.md), and may be slower on others.
    Weights, optimiser state and the loss stay float32 in every case.
    """
    import torch

    kind = getattr(device, "type", str(device))
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if kind == "cuda" else None
    if precision == "float16" and kind != "cuda":
        raise ValueError("train.precision float16 needs CUDA; on a CPU use bfloat16")
    return None if precision == "float32" else getattr(torch, precision)


def profile_overrides(params: dict[str, Any], name: str) -> list[str]:
    """The `section.key=value` overrides of profile `name` (params.yaml `profiles`), in file order.

    A profile is a named set of overrides laid over the defaults, e.g. the `full` configuration
    that `make full` hands to `dvc exp run -S ...`. Every key must exist in the params.
    """
    profiles = params.get("profiles") or {}
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ValueError(f"no profile {name!r} in params (profiles: {known})")
    assignments = []
    for dotted, value in (profiles[name] or {}).items():
        node: Any = params
        for key in str(dotted).split("."):
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"profile {name!r} sets {dotted!r}, which is not a param")
            node = node[key]
        assignments.append(
            f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        )
    return assignments
