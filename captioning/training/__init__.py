"""Training a caption decoder on cached image features (or on images, fine-tuning the encoder).

`train(settings)` selects the data by query, fills the feature cache, builds the vocabulary
from the training captions, trains with AdamW (warm-up then decay, label smoothing, gradient
clipping), validates with CIDEr after every epoch, stops early, and saves the best model as a
package; a killed run resumes from its checkpoint to the very same weights.

Modules, one per part of a run:
    run           `train`, the entry point: one decoder or an ensemble
    trainer       `Trainer` and its `TrainState`: one decoder's epochs, validation, checkpoints
    ensemble      each member of `model.ensemble` in turn, then their Ensemble packaged
    data          caption pairs over cached features, data splits, image loading and augmentation
    steps         the learning-rate schedule, one cross-entropy or self-critical step, NaN guards
    validation    captions of the validation images and their scores
    checkpoints   checkpoint reading, RNG state, the resume fingerprint, the package's config
    distributed   rank, barriers, gradient averaging and weight digests under torchrun
    base          TrainingError, TrainResult, callback dispatch
"""

from captioning.training.base import TrainingError, TrainResult
from captioning.training.checkpoints import CHECKPOINT_FILE, PACKAGE_DIR, fingerprint
from captioning.training.data import (
    CaptionData,
    FeatureStores,
    augment,
    caption_data,
    gather_rows,
    image_keys,
    load_split,
    references_by_key,
)
from captioning.training.distributed import RANKS_FILE, backend_for, weights_digest
from captioning.training.run import HISTORY_FILE, train
from captioning.training.steps import MAX_NONFINITE_STEPS, lr_factor, needs_grad_scaler, scst_step, training_step
from captioning.training.trainer import Trainer, TrainState
from captioning.training.validation import caption_batch, quick_scores, validate

__all__ = [
    "CHECKPOINT_FILE",
    "HISTORY_FILE",
    "MAX_NONFINITE_STEPS",
    "PACKAGE_DIR",
    "RANKS_FILE",
    "CaptionData",
    "FeatureStores",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingError",
    "augment",
    "backend_for",
    "caption_batch",
    "caption_data",
    "fingerprint",
    "gather_rows",
    "image_keys",
    "load_split",
    "lr_factor",
    "needs_grad_scaler",
    "quick_scores",
    "references_by_key",
    "scst_step",
    "train",
    "training_step",
    "validate",
    "weights_digest",
]
