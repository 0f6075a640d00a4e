"""One optimisation step: the learning-rate schedule, a cross-entropy step (teacher forcing,
optionally under autocast), a self-critical step, and the guards against NaN and inf."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from captioning.training.base import TrainingError
from captioning.training.distributed import any_rank, average_gradients

# Steps in a row whose loss is NaN or inf (each skipped) before training gives up: a few are
# a bad batch, this many mean the weights or the learning rate are beyond repair.
MAX_NONFINITE_STEPS = 20


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over `warmup` steps, then cosine (or linear) decay to zero at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 and float32 ones do not."""
    return dtype == torch.float16


def training_step(
    model,
    optimizer,
    scheduler,
    scaler,
    feats: torch.Tensor,
    tokens: torch.Tensor,
    label_smoothing: float = 0.0,
    alpha_c: float = 0.0,
    grad_clip: float = 0.0,
    encoder=None,
    dtype: torch.dtype | None = None,
) -> float:
    """One optimisation step on a batch (teacher forcing); returns the caption loss.

    With an `encoder` (fine-tuning), `feats` are pixels that it encodes first. `dtype`
    (`config.autocast_dtype`) runs the forward pass under autocast in float16 or bfloat16;
    None: float32. The loss is computed in float32; `scaler` is enabled for float16 only.
    """
    autocast = torch.autocast(feats.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        if encoder is not None:
            feats = encoder(feats)
        logits, aux = model(feats, tokens[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            tokens[:, 1:].reshape(-1),
            ignore_index=0,
            label_smoothing=label_smoothing,
        )
        total = loss + alpha_c * aux
    optimizer.zero_grad(set_to_none=True)
    if nonfinite(total):
        return math.nan  # skipped: the caller counts it
    scaler.scale(total).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        # Every optimised parameter: the decoder's, and the encoder's trained stages when fine-tuning.
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return float(loss.detach())


def scst_step(
    model,
    optimizer,
    scheduler,
    feats: torch.Tensor,
    images,
    cider,
    samples: int,
    max_length: int,
    grad_clip: float = 0.0,
    top_k: int = 0,
) -> tuple[float, float]:
    """One self-critical step on a batch of images (full precision); returns the loss and the mean reward.

    `model` is the bare decoder (sampling goes through its `step`, not DistributedDataParallel's
    forward), so under torchrun the gradients are averaged here.
    """
    from captioning.training.scst import scst_loss

    loss, reward = scst_loss(model, feats, images, cider, samples, max_length, top_k)
    optimizer.zero_grad(set_to_none=True)
    if nonfinite(loss):
        return math.nan, reward
    loss.backward()
    average_gradients(model)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), reward


def nonfinite(loss: torch.Tensor) -> bool:
    """True when the loss is NaN or inf on this rank or any other: the step is then skipped
    (no backward, no optimizer step), since one such step turns every weight into NaN.
    Every rank decides alike, before backward, so DistributedDataParallel never waits on a
    rank that skipped."""
    return any_rank(torch.logical_not(torch.isfinite(loss.detach())).to(torch.int32).reshape(1))


def nonfinite_weights(*modules) -> list[str]:
    """Names of the parameters holding a NaN or inf, in the given modules (None ones skipped)."""
    return [
        name
        for module in modules
        if module is not None
        for name, tensor in module.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def diverged(what: str) -> TrainingError:
    return TrainingError(f"{what}: training diverged; lower train.lr")
