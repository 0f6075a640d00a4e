"""The three decoders: shapes, the step/forward contract, rebuilding, and that each can learn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioning.config import autocast_dtype
from captioning.inference.decoding import greedy
from captioning.models import DEFAULTS, MODELS, build_model
from captioning.models.base import additive_scores
from captioning.training import training_step
from captioning.vocab import BOS, EOS, PAD, Vocabulary

torch.set_num_threads(1)

DECODERS = sorted(MODELS)
TINY = {"embed_dim": 24, "hidden_dim": 32, "attention_dim": 16, "dropout": 0.0, "layers": 1, "heads": 2, "ff_dim": 48}
VOCAB, CHANNELS, POSITIONS = 20, 16, 7


def tiny(decoder: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model({"decoder": decoder, **TINY, **overrides}, VOCAB, CHANNELS)


def random_tokens(batch: int, length: int) -> torch.Tensor:
    tokens = torch.randint(4, VOCAB, (batch, length))
    tokens[:, 0] = BOS
    return tokens


@pytest.mark.parametrize("decoder", DECODERS)
def test_forward_shapes_and_float16_features(decoder):
    model = tiny(decoder)
    features = torch.randn(3, POSITIONS, CHANNELS).half()  # the feature cache stores float16
    logits, aux = model(features, random_tokens(3, 6))
    assert logits.shape == (3, 6, VOCAB) and logits.dtype == torch.float32
    assert aux.shape == () and torch.isfinite(aux)
    if decoder == "attention":
        assert aux.item() > 0
    else:
        assert aux.item() == 0.0


@pytest.mark.parametrize("decoder", DECODERS)
def test_step_matches_teacher_forcing(decoder):
    """Generating word by word gives the same distributions as `forward` on the same words."""
    model = tiny(decoder).eval()
    features, tokens = torch.randn(4, POSITIONS, CHANNELS), random_tokens(4, 7)
    with torch.no_grad():
        expected = F.log_softmax(model(features, tokens)[0], dim=-1)
        state = model.init_state(features)
        for t in range(tokens.size(1)):
            log_probs, state, attention = model.step(tokens[:, t], state)
            torch.testing.assert_close(log_probs, expected[:, t], atol=1e-5, rtol=1e-5)
            if decoder == "show_tell":
                assert attention is None
            else:
                assert attention.shape == (4, POSITIONS)
                torch.testing.assert_close(attention.sum(-1), torch.ones(4))


@pytest.mark.parametrize("decoder", DECODERS)
def test_steps_with_static_state_shared_by_an_images_rows(decoder):
    """`start` with k rows per image (beams) steps as the model does on each image repeated k times."""
    model, k = tiny(decoder).eval(), 3
    features, tokens = torch.randn(2, POSITIONS, CHANNELS), random_tokens(2 * k, 5)
    with torch.no_grad():
        shared, repeated = model.start(features, 2 * k), model.init_state(features.repeat_interleave(k, dim=0))
        for t in range(tokens.size(1)):
            log_probs, shared, attention = model.step(tokens[:, t], shared)
            expected, repeated, expected_attention = model.step(tokens[:, t], repeated)
            torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=1e-5)
            if attention is not None:
                torch.testing.assert_close(attention, expected_attention, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_features_shared_by_an_images_captions(decoder):
    """One feature row for k adjacent caption rows gives the logits, loss and gradients of
    repeating that row k times (training with train.captions_per_image)."""
    model = tiny(decoder).eval()
    features, tokens = torch.randn(3, POSITIONS, CHANNELS), random_tokens(12, 6)
    shared_logits, shared_aux = model(features, tokens)
    (shared_logits.logsumexp(-1).mean() + shared_aux).backward()
    shared_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits, aux = model(features.repeat_interleave(4, dim=0), tokens)
    (logits.logsumexp(-1).mean() + aux).backward()
    torch.testing.assert_close(shared_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_aux, aux)
    assert shared_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(shared_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        model(features, random_tokens(10, 6))


@pytest.mark.parametrize("decoder", DECODERS)
def test_state_is_batch_first(decoder):
    """Reordering the state rows reorders the next step's outputs the same way."""
    model = tiny(decoder).eval()
    features, tokens = torch.randn(3, POSITIONS, CHANNELS), random_tokens(3, 3)
    order = torch.tensor([2, 0, 0, 1])
    with torch.no_grad():
        state = model.init_state(features)
        assert all(isinstance(v, torch.Tensor) and v.size(0) == 3 for v in state.values())
        for t in range(2):
            _, state, _ = model.step(tokens[:, t], state)
        reordered = {k: v.index_select(0, order) for k, v in state.items()}
        full, _, _ = model.step(tokens[:, 2], state)
        picked, _, _ = model.step(tokens[:, 2].index_select(0, order), reordered)
    torch.testing.assert_close(picked, full.index_select(0, order), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_rebuild_from_config(decoder):
    model = tiny(decoder)
    again = build_model(model.config, model.vocab_size, model.feature_dim)
    again.load_state_dict(model.state_dict())  # strict: same architecture
    assert type(again) is type(model) and again.config == model.config
    assert set(model.config) == {"decoder", *DEFAULTS}


def test_build_model_errors():
    with pytest.raises(ValueError, match="attention, show_tell, transformer"):
        build_model({"decoder": "lstm"}, VOCAB, CHANNELS)
    with pytest.raises(ValueError, match="divisible"):
        build_model({"decoder": "transformer", "hidden_dim": 30, "heads": 4}, VOCAB, CHANNELS)
    with pytest.raises(ValueError, match="positive integer"):
        build_model({"decoder": "attention", "hidden_dim": 0}, VOCAB, CHANNELS)
    with pytest.raises(ValueError, match="dropout"):
        build_model({"decoder": "attention", "dropout": 1.5}, VOCAB, CHANNELS)


@pytest.mark.parametrize("decoder", DECODERS)
def test_wrong_feature_size_is_refused(decoder):
    model = tiny(decoder)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, POSITIONS, CHANNELS + 1), random_tokens(2, 3))
    with pytest.raises(ValueError, match="batch, positions, channels"):
        model.init_state(torch.randn(2, CHANNELS))


def test_attention_regulariser_has_gradients():
    model = tiny("attention")
    _, aux = model(torch.randn(2, POSITIONS, CHANNELS), random_tokens(2, 5))
    aux.backward()
    assert model.hidden_att.weight.grad.abs().sum() > 0


def test_additive_attention_in_image_groups_equals_one_piece():
    """Decoding scores additive attention a few images at a time; training in one piece."""
    torch.manual_seed(0)
    feature_att, hidden, score = torch.randn(7, 6, 16), torch.randn(7, 3, 1, 16), torch.nn.Linear(16, 1)
    whole = score((feature_att[:, None] + hidden).tanh()).squeeze(-1)
    with torch.no_grad():
        for group_elements in (1, 3 * 6 * 16, 2 * 3 * 6 * 16 + 1, 1 << 20):
            grouped = additive_scores(feature_att, hidden, score, group_elements)
            assert grouped.shape == (7, 3, 6)
            torch.testing.assert_close(grouped, whole.detach())
    # With autograd it is one product, and gradients reach the score layer.
    additive_scores(feature_att, hidden, score, group_elements=1).sum().backward()
    assert score.weight.grad.abs().sum() > 0


def test_attention_regulariser_ignores_padding():
    """Padding after EOS must not change the regulariser."""
    model = tiny("attention").eval()
    features = torch.randn(1, POSITIONS, CHANNELS)
    short = torch.tensor([[BOS, 5, 6, EOS]])
    padded = torch.tensor([[BOS, 5, 6, EOS, PAD, PAD]])
    with torch.no_grad():
        torch.testing.assert_close(model(features, short)[1], model(features, padded)[1])


CAPTIONS = ["a red square on the left", "two blue circles", "a green triangle above a circle", "one small star"]


def batch_tokens(vocab: Vocabulary, captions: list[str]) -> torch.Tensor:
    rows = [[BOS] + vocab.encode(c) + [EOS] for c in captions]
    width = max(map(len, rows))
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def overfit_problem(decoder: str):
    """The CAPTIONS task: vocabulary, one random feature map per caption, their tokens, a fresh model."""
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    torch.manual_seed(1)
    features = torch.randn(len(CAPTIONS), POSITIONS, CHANNELS)
    return (
        vocab,
        features,
        batch_tokens(vocab, CAPTIONS),
        build_model({"decoder": decoder, **TINY}, len(vocab), CHANNELS),
    )


@pytest.mark.parametrize("decoder", DECODERS)
def test_tiny_model_overfits_and_greedy_reproduces(decoder):
    vocab, features, tokens, model = overfit_problem(decoder)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(200):
        logits, aux = model(features, tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, len(vocab)), tokens[:, 1:].reshape(-1), ignore_index=PAD)
        optimiser.zero_grad()
        (loss + 0.01 * aux).backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 < losses[0] / 10
    results = greedy(model, features, max_length=10)
    assert model.training  # decoding restores the mode it found
    assert [vocab.decode(r[0].tokens) for r in results] == CAPTIONS
    assert all(r[0].finished for r in results)


def test_autocast_precision_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype(cpu) is None and autocast_dtype(cuda) is torch.float16  # auto
    assert autocast_dtype(cpu, "float32") is None and autocast_dtype(cuda, "float32") is None
    assert autocast_dtype(cpu, "bfloat16") is torch.bfloat16 and autocast_dtype(cuda, "bfloat16") is torch.bfloat16
    assert autocast_dtype(cuda, "float16") is torch.float16
    with pytest.raises(ValueError, match="float16 needs CUDA; on a CPU use bfloat16"):
        autocast_dtype(cpu, "float16")
    for bad in ("fp16", "bf16", "", "Float32"):
        with pytest.raises(ValueError, match="expected one of auto, float32, bfloat16, float16"):
            autocast_dtype(cpu, bad)


@pytest.mark.parametrize("decoder", DECODERS)
def test_bfloat16_training_steps_learn_and_keep_float32_weights(decoder):
    vocab, features, tokens, model = overfit_problem(decoder)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    losses = [
        training_step(model, optimiser, scheduler, scaler, features, tokens, 0.0, 0.01, 5.0, dtype=torch.bfloat16)
        for _ in range(200)
    ]
    # bfloat16 keeps about 3 significant digits: the loss falls, if not as far as in float32.
    assert losses[-1] < 0.1 < losses[0] / 10
    assert all(p.dtype == torch.float32 for p in model.parameters())
    results = greedy(model, features, max_length=10)  # decoding itself runs in float32
    assert [vocab.decode(r[0].tokens) for r in results] == CAPTIONS
