"""The entry point: `train(settings)` trains one decoder or an ensemble into out_dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from captioning.settings import Settings
from captioning.training import distributed
from captioning.training.base import TrainResult
from captioning.training.ensemble import train_ensemble
from captioning.training.trainer import Trainer

HISTORY_FILE = "history.json"


def train(
    settings: Settings, callbacks: Iterable = (), out_dir: str | Path | None = None, resume: bool = True
) -> TrainResult:
    """Train a caption model as `settings` say; return where the best package is and the history.

    With `resume`, an existing out_dir/checkpoint.pt from the same settings is continued
    (or, when that run has finished, its result is returned without training).
    With `model.ensemble` (more decoders) each decoder trains in turn (see `ensemble`),
    and out_dir/model is their Ensemble. The per-epoch history is also written to
    out_dir/history.json.
    """
    from captioning.config import artifacts_dir

    out_dir = Path(out_dir) if out_dir else artifacts_dir() / "train"
    if settings.model.ensemble:
        result = train_ensemble(settings, list(callbacks), out_dir, resume)
    else:
        result = Trainer(settings, callbacks, out_dir, resume).run()
    if distributed.rank() == 0:
        (out_dir / HISTORY_FILE).write_text(json.dumps(result.history, indent=1), encoding="utf-8")
    return result
