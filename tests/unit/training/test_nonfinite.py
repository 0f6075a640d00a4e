"""The guard against NaN and inf losses: a step is skipped, too many in a row or broken weights stop
training, and the command line's JSON never holds NaN."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout

import pytest
import torch

from captioning.cli.common import print_json
from captioning.models import build_model
from captioning.training import MAX_NONFINITE_STEPS, TrainingError, TrainState, training_step
from captioning.training.steps import nonfinite_weights
from captioning.vocab import BOS

torch.set_num_threads(1)

TINY = {"decoder": "attention", "embed_dim": 16, "hidden_dim": 24, "attention_dim": 8, "dropout": 0.0}


def _setup():
    torch.manual_seed(0)
    model = build_model(TINY, 12, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tokens = torch.randint(4, 12, (3, 6))
    tokens[:, 0] = BOS
    return model, optimizer, scheduler, scaler, tokens


def test_a_nan_batch_is_skipped_without_touching_the_weights():
    model, optimizer, scheduler, scaler, tokens = _setup()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    features = torch.randn(3, 5, 8)
    features[1, 2, 3] = math.nan  # one bad value in one image

    loss = training_step(model, optimizer, scheduler, scaler, features, tokens, 0.0, 1.0, 5.0)

    assert math.isnan(loss)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 0  # no step taken
    good = training_step(model, optimizer, scheduler, scaler, torch.randn(3, 5, 8), tokens, 0.0, 1.0, 5.0)
    assert math.isfinite(good) and scheduler.last_epoch == 1
    assert not nonfinite_weights(model)


def test_skipped_steps_are_counted_apart_and_a_long_run_of_them_stops_training():
    state = TrainState()
    state.count_loss(2.0)
    for _ in range(MAX_NONFINITE_STEPS - 1):
        state.count_loss(math.nan)
    state.count_loss(1.0)  # a finite step ends the run of skipped ones
    assert (state.loss_sum, state.loss_count, state.skipped, state.nonfinite_run) == (
        3.0,
        2,
        MAX_NONFINITE_STEPS - 1,
        0,
    )
    for _ in range(MAX_NONFINITE_STEPS - 1):
        state.count_loss(math.inf)
    with pytest.raises(TrainingError, match=f"NaN or inf in {MAX_NONFINITE_STEPS} steps in a row"):
        state.count_loss(-math.inf)


def test_an_epoch_ending_with_nonfinite_weights_or_no_step_stops_training():
    model = build_model(TINY, 12, 8)
    TrainState(loss_count=3, skipped=2).check_epoch(0, model, None)  # some steps trained: fine
    with pytest.raises(TrainingError, match="every step of epoch 2 had a NaN or inf loss"):
        TrainState(skipped=4).check_epoch(1, model, None)
    with torch.no_grad():
        next(model.parameters())[0] = math.inf
    with pytest.raises(TrainingError, match=r"after epoch 1, 1 weight tensors hold NaN or inf \(first: "):
        TrainState(loss_count=3).check_epoch(0, model, None)


def test_print_json_writes_nan_and_inf_as_null():
    out = io.StringIO()
    with redirect_stdout(out):
        print_json({"best": {"val_loss": math.nan, "train_loss": 1.5, "lr": [math.inf, 2.0]}, "epochs": 1})
    parsed = json.loads(out.getvalue(), parse_constant=lambda constant: pytest.fail(f"not JSON: {constant}"))
    assert parsed == {"best": {"val_loss": None, "train_loss": 1.5, "lr": [None, 2.0]}, "epochs": 1}
