"""Where things live, the path of params.yaml, the device.

Everything that depends on the environment is read here, so the rest of the
library takes plain arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def autocast_dtype(device, precision: str = "auto"):
    """The dtype training's forward passes compute in under autocast, or None for float32.

    `auto`: float16 on CUDA (with a gradient scaler), float32 elsewhere. `bfloat16` runs on
    CUDA and on CPUs; it pays off on CPUs with bfloat16 instructions (AVX-512 BF16, AMX), where
    the decoders trained 1.3-1.9 times as fast (reports/BENCHMARKS.md), and may be slower on others.
    Weights, optimiser state and the loss stay float32 in every case.
    """
    import torch

    from captioning.settings import PRECISIONS

    kind = getattr(device, "type", str(device))
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if kind == "cuda" else None
    if precision == "float16" and kind != "cuda":
        raise ValueError("train.precision float16 needs CUDA; on a CPU use bfloat16")
    return None if precision == "float32" else getattr(torch, precision)


def decoding_precision(device, precision: str) -> str:
    """The arithmetic a decoder captions in on `device` when the package asks for `precision`.

    int8 (dynamic quantization) runs on CPUs only; bfloat16 matrix products run on CUDA and on
    CPUs with bfloat16 units (AVX-512 BF16 or AMX), where they are several times as fast as
    float32 ones; elsewhere they would be emulated and slower, so float32 runs instead.
    """
    import torch

    kind = getattr(device, "type", str(device))
    if precision == "int8":
        return "int8" if kind == "cpu" else "float32"
    if precision == "bfloat16" and kind == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU feature probes
        native = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
        return "bfloat16" if native else "float32"
    return precision
