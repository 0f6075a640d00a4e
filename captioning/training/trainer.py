"""Training one decoder: `Trainer` builds the data, model and optimizer from the settings, runs
the cross-entropy epochs and then the self-critical ones, validates after every epoch, packages
the best model, and checkpoints so that a killed run resumes to the very same weights.

The data order of an epoch comes from seed + epoch, and the RNG states are checkpointed. With
`train.finetune_blocks` = k > 0 the encoder's last k stages train too, on images decoded by
DataLoader workers, and the package carries the encoder's weights. Under torchrun every rank
runs a Trainer; rank 0 alone writes files and calls the callbacks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from captioning.inference.model_package import save_checkpoint, save_package
from captioning.settings import Settings
from captioning.training import distributed
from captioning.training.base import TrainingError, TrainResult, notify
from captioning.training.checkpoints import (
    CHECKPOINT_FILE,
    PACKAGE_DIR,
    fingerprint,
    package_config,
    read_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from captioning.training.data import (
    caption_data,
    caption_memory,
    drift_reference,
    encode_images,
    image_loader,
    image_workers,
    load_split,
    ngram_frequencies,
    pair_keys,
    references_by_key,
    validation_split,
)
from captioning.training.steps import (
    MAX_NONFINITE_STEPS,
    diverged,
    lr_factor,
    needs_grad_scaler,
    nonfinite_weights,
    scst_step,
    training_step,
)
from captioning.training.validation import validate

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """A run's progress, checkpointed with the weights: where it is, its best epoch so far and
    the running sums of the epoch under way."""

    epoch: int = 0
    batch: int = 0  # batches of the current epoch already done
    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    bad_epochs: int = 0  # epochs in a row without a better validation CIDEr
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0
    reward_sum: float = 0.0
    skipped: int = 0  # non-finite steps of the current epoch
    nonfinite_run: int = 0  # non-finite steps in a row

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> "TrainState":
        defaults = asdict(cls())
        return cls(**{key: checkpoint.get(key, value) for key, value in defaults.items()})

    def count_loss(self, value: float) -> None:
        """Add a step's loss to the epoch's mean; a skipped (non-finite) step is counted apart,
        and too many in a row stop training rather than spin on a model beyond repair."""
        if math.isfinite(value):
            self.loss_sum += value
            self.loss_count += 1
            self.nonfinite_run = 0
            return
        self.skipped += 1
        self.nonfinite_run += 1
        if self.nonfinite_run >= MAX_NONFINITE_STEPS:
            raise diverged(f"the loss was NaN or inf in {self.nonfinite_run} steps in a row (up to step {self.step})")

    def check_epoch(self, epoch: int, core, encoder) -> None:
        """Stop before validating or packaging a model whose weights are no longer numbers,
        or after an epoch in which no step could be taken."""
        broken = nonfinite_weights(core, encoder)
        if broken:
            raise diverged(
                f"after epoch {epoch + 1}, {len(broken)} weight tensors hold NaN or inf (first: {broken[0]})"
            )
        if self.skipped and not self.loss_count:
            raise diverged(f"every step of epoch {epoch + 1} had a NaN or inf loss ({self.skipped} skipped)")

    def next_epoch(self, metrics: dict[str, Any], improved: bool) -> None:
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        self.history.append(metrics)
        self.epoch += 1
        self.batch, self.loss_sum, self.loss_count, self.reward_sum, self.skipped = 0, 0.0, 0, 0.0, 0


@dataclass
class EpochRun:
    """What one epoch's loop measured, for its metrics."""

    seen: int = 0  # captions trained on by this rank
    data_time: float = 0.0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """Trains the decoder `settings.model.decoder` into out_dir (see the module's docstring)."""

    def __init__(self, settings: Settings, callbacks: Iterable, out_dir: str | Path, resume: bool = True):
        self.settings, self.train_s = settings, settings.train
        self.callbacks = list(callbacks)
        self.out_dir, self.resume = Path(out_dir), resume
        self.checkpoint_path, self.package_dir = self.out_dir / CHECKPOINT_FILE, self.out_dir / PACKAGE_DIR
        self.epochs, self.scst_epochs = self.train_s.epochs, self.train_s.scst_epochs
        self.finetune, self.per_image = self.train_s.finetune_blocks, self.train_s.captions_per_image
        self.state = TrainState()
        self.scst = False  # in the self-critical epochs
        self.cider = None  # their reward

    def run(self) -> TrainResult:
        self.check()
        with _threads(self.train_s.threads), distributed.process_group():
            try:
                return self._run()
            except BaseException as error:
                if distributed.rank() == 0:
                    notify(self.callbacks, "on_train_failed", error)
                raise

    def check(self) -> None:
        """Refuse settings that cannot train together, before any work."""
        from captioning.config import autocast_dtype, get_device

        settings, train = self.settings, self.train_s
        for key in ("train_query", "val_query"):
            if not getattr(settings.data, key):
                raise TrainingError(f"params data.{key} is missing")
        try:
            autocast_dtype(get_device(), train.precision)
        except ValueError as error:
            raise TrainingError(str(error)) from None
        if settings.decoding.rerank_neighbours and self.finetune:
            raise TrainingError(
                "decoding.rerank_neighbours needs the training images' cached features: "
                "it cannot be used with a fine-tuned encoder (train.finetune_blocks)"
            )
        if self.per_image > train.batch_size:
            raise TrainingError(
                f"train.captions_per_image must be 0 (batches of captions) or 1..batch_size "
                f"({train.batch_size}), not {self.per_image}"
            )
        if self.per_image and self.finetune:
            raise TrainingError("train.captions_per_image needs cached features (train.finetune_blocks 0)")
        if not train.lr <= torch.finfo(torch.float32).max:
            # AdamW fails deep inside its step on a rate that float32 cannot hold.
            raise TrainingError(f"train.lr must be a positive number a float32 can hold, not {train.lr}")
        if self.scst_epochs and self.finetune:
            raise TrainingError(
                "self-critical epochs (train.scst_epochs) need a frozen encoder (train.finetune_blocks 0)"
            )

    def _run(self) -> TrainResult:
        from captioning.config import autocast_dtype, get_device

        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.device = get_device()
        self.dtype = autocast_dtype(self.device, self.train_s.precision)
        self.progress = self.train_s.progress and self.rank == 0
        checkpoint = read_checkpoint(self.checkpoint_path, self.settings) if self.resume else None
        if checkpoint is not None and checkpoint.get("finished"):
            return self._finish(TrainResult(self.package_dir, checkpoint["best"], checkpoint["history"]))
        seed_everything(self.train_s.seed)
        self._load_data(checkpoint)
        self._build_encoder()
        seed_everything(self.train_s.seed)  # the initial weights depend on the seed only
        self._build_model()
        self._build_optimizer()
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.rank == 0:
            notify(self.callbacks, "on_train_start", self._start_info(checkpoint))
        self._epochs()
        if self.world > 1:
            distributed.record_rank_digests(self.core, self.device, self.out_dir)
        return self._finish(TrainResult(self.package_dir, self.state.best, self.state.history))

    def _finish(self, result: TrainResult) -> TrainResult:
        if self.rank == 0:
            notify(self.callbacks, "on_train_end", result)
        return result

    # ------------------------------------------------------------------ building

    def _load_data(self, checkpoint: dict[str, Any] | None) -> None:
        from captioning.vocab import Vocabulary

        settings, cache = self.settings, not self.finetune
        train_records, train_store = load_split(
            settings.data.train_query, settings.features, self.progress, self.rank, cache=cache
        )
        self.val_records, val_store = validation_split(settings, self.progress, self.rank, cache=cache)
        if checkpoint is not None:
            self.vocab = Vocabulary.from_dict(checkpoint["vocab"])
        else:
            captions = [caption for record in train_records for caption in record.captions]
            self.vocab = Vocabulary.build(captions, settings.vocab.min_freq)
        max_length = settings.vocab.max_length
        self.train_data = caption_data(train_records, train_store, self.vocab, max_length)
        self.frequencies = ngram_frequencies(self.train_data)
        # Only a package that reranks with neighbours carries them (for MSCOCO they would weigh 300 MB).
        self.memory = caption_memory(self.train_data) if settings.decoding.rerank_neighbours else None
        # Rank 0 alone writes the package, and so alone needs the training images' drift statistics.
        self.drift = drift_reference(self.train_data, settings) if self.rank == 0 else None
        self.val_data = caption_data(self.val_records, val_store, self.vocab, max_length)
        self.references = references_by_key(self.val_records)
        self.workers = image_workers(settings.features)
        self.feature_dim = None if self.finetune else train_store.dim

    def _build_encoder(self) -> None:
        """The encoder whose last stages train (fine-tuning), else None: features come from the cache."""
        from captioning.features.encoder import ENCODERS, build_encoder

        self.encoder = self.core_encoder = None
        self.encoder_groups: list[dict[str, Any]] = []
        if not self.finetune:
            return
        name = self.settings.features.encoder
        self.feature_dim = ENCODERS[name].feature_dim
        # Never optimize_for_inference() here: folded batch norms cannot train.
        self.core_encoder = build_encoder(name).to(self.device)
        try:
            trainable = self.core_encoder.finetune(self.finetune)
        except ValueError as error:
            raise TrainingError(f"train.{error}") from None
        self.encoder_groups.append({"params": trainable, "lr": self.train_s.encoder_lr})
        self.encoder = distributed.parallel(self.core_encoder, self.device)

    def _build_model(self) -> None:
        from captioning.models import build_model

        self.core = build_model(self.settings.model.to_dict(), len(self.vocab), self.feature_dim).to(self.device)
        self.model = distributed.parallel(self.core, self.device)

    def _build_optimizer(self) -> None:
        train = self.train_s
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.model.parameters())}, *self.encoder_groups],
            lr=train.lr,
            weight_decay=train.weight_decay,
        )
        # captions_per_image k: the sampler draws images, each step takes batch_size // k of them
        # with k captions each, and the decoder does its image-side work once per image.
        self.step_items = train.batch_size // self.per_image if self.per_image else train.batch_size
        self.sampler = torch.utils.data.DistributedSampler(
            range(len(self.train_data.image_ids) if self.per_image else len(self.train_data)),
            num_replicas=self.world,
            rank=self.rank,
            shuffle=True,
            seed=train.seed,
            drop_last=False,
        )
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.step_items)
        total_steps = self.epochs * self.steps_per_epoch
        # Self-critical epochs run at their own constant rate after the cross-entropy schedule.
        self.scst_factor = train.scst_lr / train.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: (
                self.scst_factor if self.scst else lr_factor(step, train.warmup_steps, total_steps, train.schedule)
            ),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(self.dtype))

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.core.load_state_dict(checkpoint["model"])
        if self.core_encoder is not None:
            self.core_encoder.backbone.load_state_dict(checkpoint["encoder"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState.from_checkpoint(checkpoint)
        set_rng_state(checkpoint["rng"])
        logger.info("resuming from %s at epoch %d batch %d", self.checkpoint_path, self.state.epoch, self.state.batch)

    def _start_info(self, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
        state = self.state
        return {
            "params": self.settings.to_dict(),
            "out_dir": str(self.out_dir),
            "vocab": self.vocab,
            "vocab_size": len(self.vocab),
            "train_images": len(self.train_data.image_ids),
            "train_pairs": len(self.train_data),
            "val_images": len(self.val_data.image_ids),
            "steps_per_epoch": self.steps_per_epoch,
            "parameters": sum(p.numel() for p in self.core.parameters()),
            "device": str(self.device),
            "precision": str(self.dtype or torch.float32).removeprefix("torch."),
            "finetune_blocks": self.finetune,
            "encoder_trainable_parameters": sum(p.numel() for group in self.encoder_groups for p in group["params"]),
            "world_size": self.world,
            "resumed_from": None
            if checkpoint is None
            else {"epoch": state.epoch, "batch": state.batch, "step": state.step},
            "val_examples": [
                {"image_id": r.image_id, "path": r.path, "references": list(r.captions)} for r in self.val_records[:8]
            ],
        }

    # ------------------------------------------------------------------ the epochs

    def _epochs(self) -> None:
        state, last = self.state, self.epochs + self.scst_epochs
        stop = state.bad_epochs >= self.train_s.patience
        while state.epoch < last:
            if stop:
                if self.scst or state.epoch > self.epochs or not self.scst_epochs:
                    break
                # Early stopping ends the cross-entropy phase; the self-critical epochs still run.
                state.epoch, state.bad_epochs = self.epochs, 0
            epoch = state.epoch
            if epoch >= self.epochs and not self.scst:
                self._enter_scst(starting=state.batch == 0 and epoch == self.epochs)
            batches = self._scst_batches(epoch) if self.scst else self._batches(epoch)
            run = self._run_epoch(epoch, batches)
            stop = self._end_epoch(epoch, run)

    def _batches(self, epoch: int) -> list[list[int]]:
        """The cross-entropy epoch's batches of pair indices (this rank's share)."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        batches = [order[i : i + self.step_items] for i in range(0, len(order), self.step_items)]
        if self.per_image:
            # Each batch of images as its pairs: k adjacent captions per image.
            captions = self.train_data.captions_per_image(self.per_image, self.train_s.seed + epoch)
            batches = [captions[images].reshape(-1).tolist() for images in batches]
        return batches

    def _scst_batches(self, epoch: int) -> list[list[int]]:
        """Batches of images, each sampled scst_samples times: about batch_size captions a step."""
        generator = torch.Generator().manual_seed(self.train_s.seed + epoch)
        order = torch.randperm(len(self.train_data.image_ids), generator=generator)
        # Every rank gets as many batches (the gradients are averaged across ranks at each step).
        order = order.tolist()[: len(order) - len(order) % self.world][self.rank :: self.world]
        step_images = max(1, self.train_s.batch_size // self.train_s.scst_samples)
        return [order[i : i + step_images] for i in range(0, len(order), step_images)]

    def _enter_scst(self, starting: bool) -> None:
        """Switch to self-critical training with the CIDEr-D reward over the training references.

        On the first self-critical step the decoder restarts from the best cross-entropy model
        (the package), which the validation CIDEr chose; a resumed run keeps its checkpoint's weights.
        """
        from captioning.inference.cider import CiderD
        from captioning.inference.model_package import load_package
        from captioning.training.scst import references_from_pairs

        if starting and (self.package_dir / "weights.pt").is_file():
            best, _, _ = load_package(self.package_dir)
            self.core.load_state_dict(best.state_dict())
        self.scst = True
        if starting:
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * self.scst_factor
            # Patience counts anew: the cross-entropy epochs' misses do not stop this phase.
            self.state.bad_epochs = 0
        data = self.train_data
        self.cider = CiderD(references_from_pairs(data.rows, data.tokens, len(data.image_ids)), self.frequencies)

    def _run_epoch(self, epoch: int, batches: list[list[int]]) -> EpochRun:
        from tqdm import tqdm

        state, run = self.state, EpochRun()
        self.model.train()
        pixels = None
        if self.encoder is not None:
            self.encoder.train()  # only the fine-tuned stages: the Encoder keeps frozen parts in eval mode
            augment_seed = f"{self.train_s.seed}:{epoch}" if self.train_s.augment else None
            keys = pair_keys(self.train_data, batches[state.batch :], augment_seed)
            size = self.core_encoder.image_size
            pixels = iter(image_loader(self.train_data.paths, keys, size, self.workers, self.device))
        label = f"{'self-critical ' if self.scst else ''}epoch {epoch + 1}/{self.epochs + self.scst_epochs}"
        bar = tqdm(total=len(batches), initial=state.batch, desc=label, disable=not self.progress, leave=False)
        for index in range(state.batch, len(batches)):
            value = self._step(batches[index], pixels, run)
            state.step += 1
            state.batch = index + 1
            state.count_loss(value)
            # Captions: in self-critical epochs every image of the batch is sampled scst_samples times.
            run.seen += len(batches[index]) * (self.train_s.scst_samples if self.scst else 1)
            rate = run.seen * self.world / max(1e-9, time.perf_counter() - run.start)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", cap_s=f"{rate:.0f}")
            if self.rank == 0:
                notify(self.callbacks, "on_batch_end", state.step, value)
            every = self.train_s.checkpoint_every
            if every > 0 and state.step % every == 0 and state.batch < len(batches):
                self._write_checkpoint()
        bar.close()
        return run

    def _step(self, batch: list[int], pixels, run: EpochRun) -> float:
        """One step on `batch` (pair indices, or image indices in self-critical epochs); returns its loss."""
        train, tick = self.train_s, time.perf_counter()
        if self.scst:
            feats = self.train_data.image_features(batch, self.device)
            run.data_time += time.perf_counter() - tick
            max_length = self.settings.decoding.max_length
            value, reward = scst_step(
                self.core,
                self.optimizer,
                self.scheduler,
                feats,
                batch,
                self.cider,
                train.scst_samples,
                max_length,
                train.grad_clip,
                train.scst_top_k,
            )
            self.state.reward_sum += reward if math.isfinite(value) else 0.0
            return value
        if pixels is None:
            feats, tokens = self.train_data.batch(batch, self.device, max(1, self.per_image))
        else:
            feats = next(pixels).to(self.device, non_blocking=True)
            tokens = self.train_data.batch_tokens(batch, self.device)
        run.data_time += time.perf_counter() - tick
        return training_step(
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            feats,
            tokens,
            train.label_smoothing,
            train.alpha_c,
            train.grad_clip,
            self.encoder,
            self.dtype,
        )

    def _end_epoch(self, epoch: int, run: EpochRun) -> bool:
        """Validate, package an improvement, checkpoint; True when patience has run out."""
        state = self.state
        state.check_epoch(epoch, self.core, self.core_encoder)
        elapsed = time.perf_counter() - run.start
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": state.step,
            "skipped_steps": state.skipped,
            "train_loss": state.loss_sum / max(1, state.loss_count),
            "lr": self.optimizer.param_groups[0]["lr"],
            "captions_per_s": run.seen * self.world / max(1e-9, elapsed),
            "data_time_share": run.data_time / max(1e-9, elapsed),
        }
        if self.scst:
            metrics["train_reward"] = state.reward_sum / max(1, state.loss_count)
        improved = self._validate(epoch, metrics) if self.rank == 0 else False
        state.next_epoch(metrics, distributed.broadcast_flag(improved, self.device))
        stop = state.bad_epochs >= self.train_s.patience
        last = self.epochs + self.scst_epochs
        self._write_checkpoint(finished=state.epoch >= last or (stop and (self.scst or not self.scst_epochs)))
        distributed.barrier()
        return stop

    def _validate(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Score the epoch's model on rank 0 (into `metrics`) and package it when it is the best yet."""
        if self.core_encoder is not None:
            # The val images through the encoder as trained so far, never the frozen cache.
            self.val_data.features = encode_images(
                self.core_encoder, self.val_data.paths, self.train_s.batch_size, self.workers, self.device
            )
        decoding = self.settings.decoding.replace(beam_size=self.train_s.val_beam_size)
        val = validate(self.core, self.vocab, self.val_data, self.references, decoding, self.device)
        samples = val.pop("samples")
        metrics.update(val)
        if not math.isfinite(metrics["val_loss"]):
            # Finite but huge weights can still give NaN outputs: such a model is never packaged.
            raise diverged(f"after epoch {epoch + 1} the validation loss is {metrics['val_loss']}")
        best = self.state.best
        improved = not best or metrics["val_CIDEr"] > best["val_CIDEr"]
        if improved:
            self.state.best = dict(metrics)
            save_package(
                self.package_dir,
                self.core,
                self.vocab,
                package_config(self.settings, self.feature_dim, metrics),
                encoder=self.core_encoder,
                frequencies=self.frequencies,
                memory=self.memory,
                drift=self.drift,
            )
        logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
        notify(self.callbacks, "on_epoch_end", epoch + 1, {**metrics, "samples": samples})
        return improved

    def _write_checkpoint(self, finished: bool = False) -> None:
        if self.rank != 0:
            return
        extra = {} if self.core_encoder is None else {"encoder": self.core_encoder.backbone.state_dict()}
        save_checkpoint(
            self.checkpoint_path,
            {
                **extra,
                "model": self.core.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "vocab": self.vocab.to_dict(),
                "fingerprint": fingerprint(self.settings),
                "finished": finished,
                **asdict(self.state),
            },
        )


class _threads:
    """torch's CPU threads set to `count` for the duration (0: left as they are)."""

    def __init__(self, count: int):
        self.count, self.previous = count, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.count > 0:
            # Small decoders on a busy CPU run far faster on one thread than on contended several.
            torch.set_num_threads(self.count)

    def __exit__(self, *exc) -> None:
        if self.count > 0:
            torch.set_num_threads(self.previous)
