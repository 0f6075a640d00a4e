"""Training an ensemble (`model.ensemble`): each member trains in turn as its own run, in
out_dir/members/<n>-<decoder> with its own settings (`Settings.member`), and out_dir/model is
the Ensemble of their best models, validated as one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from captioning.inference.model_package import save_package
from captioning.settings import Settings
from captioning.training import distributed
from captioning.training.base import TrainingError, TrainResult, notify
from captioning.training.checkpoints import PACKAGE_DIR, package_config
from captioning.training.data import validation_data
from captioning.training.trainer import Trainer
from captioning.training.validation import validate

logger = logging.getLogger(__name__)


class MemberRelay:
    """Passes a member's training events on as parts of one run: epochs and steps count on
    from the previous members', metrics carry the member's number, ends are the ensemble's."""

    def __init__(self, callbacks: list, params: dict[str, Any]):
        self.callbacks, self.params = callbacks, params
        self.member, self.epochs, self.steps, self.started = 0, 0, 0, False

    def next_member(self, result: TrainResult) -> None:
        self.member += 1
        self.epochs += len(result.history)
        self.steps += int(result.history[-1].get("step", 0)) if result.history else 0

    def on_train_start(self, info: dict[str, Any]) -> None:
        if not self.started:
            self.started = True
            notify(self.callbacks, "on_train_start", {**info, "params": self.params})

    def on_batch_end(self, step: int, loss: float) -> None:
        notify(self.callbacks, "on_batch_end", self.steps + step, loss)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        notify(self.callbacks, "on_epoch_end", self.epochs + epoch, {**metrics, "member": self.member})

    def on_train_failed(self, error: BaseException) -> None:
        notify(self.callbacks, "on_train_failed", error)


def train_ensemble(settings: Settings, callbacks: list, out_dir: Path, resume: bool) -> TrainResult:
    """Train each member (resuming or reusing its own run), then package and validate the ensemble."""
    members = settings.members()
    if any(member.train.finetune_blocks for member in members):
        raise TrainingError(
            "an ensemble (model.ensemble) needs a frozen encoder (train.finetune_blocks 0): "
            "its members read the same cached features"
        )
    relay = MemberRelay(callbacks, settings.to_dict())
    results, history = [], []
    for number, member in enumerate(members):
        member_dir = out_dir / "members" / f"{number}-{member.model.decoder}"
        result = Trainer(member, [relay], member_dir, resume).run()
        history += [{**row, "epoch": relay.epochs + row["epoch"], "member": number} for row in result.history]
        relay.next_member(result)
        results.append(result)
    if distributed.rank() != 0:
        return TrainResult(out_dir / PACKAGE_DIR, {}, history)
    try:
        scores, samples = _package_ensemble(settings, results, out_dir / PACKAGE_DIR, relay.epochs + 1)
        notify(callbacks, "on_epoch_end", relay.epochs + 1, {**scores, "samples": samples})
        best = _history_row(relay.epochs + 1, scores)
        result = TrainResult(out_dir / PACKAGE_DIR, best, history + [best])
        notify(callbacks, "on_train_end", result)
        return result
    except BaseException as error:
        notify(callbacks, "on_train_failed", error)
        raise


def _package_ensemble(
    settings: Settings, results: list[TrainResult], package_dir: Path, epoch: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """The members' best models as one Ensemble, validated and saved to package_dir; returns its
    validation scores and sample captions."""
    from captioning.config import get_device
    from captioning.inference.model_package import load_drift, load_frequencies, load_memory, load_package
    from captioning.models import Ensemble, ensemble_config

    device = get_device()
    loaded = [load_package(result.package_dir, device) for result in results]
    vocab = loaded[0][1]
    if any(other.fingerprint() != vocab.fingerprint() for _, other, _ in loaded[1:]):
        raise TrainingError("the ensemble's members were trained with different vocabularies")
    feature_dim = loaded[0][0].feature_dim
    config = ensemble_config([model.config for model, _, _ in loaded])
    ensemble = Ensemble(config, len(vocab), feature_dim, [model for model, _, _ in loaded])
    val_data, references = validation_data(settings, vocab)
    decoding = settings.decoding.replace(beam_size=settings.train.val_beam_size)
    val = validate(ensemble, vocab, val_data, references, decoding, device)
    samples = val.pop("samples")
    best = _history_row(epoch, val)
    # The members learnt from the same captions and features: the first one's n-gram
    # frequencies, caption memory and drift statistics are theirs.
    save_package(
        package_dir,
        ensemble,
        vocab,
        package_config(settings, feature_dim, best, model=config),
        frequencies=load_frequencies(results[0].package_dir, loaded[0][2]),
        memory=load_memory(results[0].package_dir, loaded[0][2]),
        drift=load_drift(results[0].package_dir, loaded[0][2]),
    )
    logger.info(
        "ensemble of %s: %s",
        [member.model.decoder for member in settings.members()],
        {k: round(v, 4) for k, v in val.items() if isinstance(v, float)},
    )
    return val, samples


def _history_row(epoch: int, scores: dict[str, Any]) -> dict[str, Any]:
    """The ensemble's validation as the run's last history row."""
    return {"epoch": epoch, "member": "ensemble", **scores}
