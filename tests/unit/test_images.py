"""open_image and preprocess: the one image path of caching, training and serving."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from captioning.images import MAX_PIXELS, ImageError, open_image, preprocess


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _photo(size=(80, 60), mode="RGB") -> Image.Image:
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((30, 30, 200), (10, 10, 40, 40))
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_any_mode_becomes_rgb(mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    image = open_image(_encoded(_photo(mode=mode), fmt))
    assert image.mode == "RGB"
    assert image.size == (80, 60)


def test_paths_bytes_and_pil_images_agree(tmp_path):
    data = _encoded(_photo(), "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    from_bytes, from_path, from_str = open_image(data), open_image(path), open_image(str(path))
    from_pil = open_image(Image.open(io.BytesIO(data)))
    assert from_bytes.tobytes() == from_path.tobytes() == from_str.tobytes() == from_pil.tobytes()


def test_empty_input_is_refused(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        open_image(b"")
    empty = tmp_path / "empty.jpg"
    empty.touch()
    with pytest.raises(ImageError, match="empty.jpg.*empty"):
        open_image(empty)


def test_non_image_bytes_are_refused(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"%PDF-1.4 this is not a picture")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(ImageError, match="notes.jpg"):
        open_image(text)


def test_truncated_jpeg_is_refused():
    data = _encoded(_photo((256, 256)), "JPEG")
    with pytest.raises(ImageError, match="truncated|corrupt"):
        open_image(data[: len(data) // 2])


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        open_image(tmp_path / "nowhere.png")


def test_unsupported_type_is_refused():
    with pytest.raises(ImageError, match="int"):
        open_image(42)  # type: ignore[arg-type]


def test_decompression_bomb_is_refused_before_decoding():
    # A 1-bit PNG of 8000 x 6000 = 48 megapixels compresses to a few kilobytes.
    bomb = _encoded(Image.new("1", (8000, 6000)), "PNG")
    assert len(bomb) < 100_000 and 8000 * 6000 > MAX_PIXELS
    with pytest.raises(ImageError, match="MAX_PIXELS"):
        open_image(bomb)


def test_preprocess_shape_and_normalisation():
    white = Image.new("RGB", (50, 30), (255, 255, 255))
    black = Image.new("RGB", (30, 50), (0, 0, 0))
    batch = preprocess([white, _encoded(black, "PNG")], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    assert torch.allclose(batch[0], torch.ones(3, 64, 64))  # inputs in [-1, 1] for EfficientNet-Lite
    assert torch.allclose(batch[1], -torch.ones(3, 64, 64))
    other = preprocess([white], 8, mean=0.0, std=1.0)
    assert torch.allclose(other, torch.ones(1, 3, 8, 8))


def test_preprocess_keeps_channel_order():
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    pixels = preprocess([red], 16)[0]
    assert pixels[0].min() == 1.0 and pixels[1].max() == -1.0 and pixels[2].max() == -1.0


def test_preprocess_of_nothing_and_of_a_bad_item():
    assert preprocess([], 32).shape == (0, 3, 32, 32)
    with pytest.raises(ImageError):
        preprocess([_photo(), b"garbage"], 32)


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PCX", "TGA", "PPM"])
def test_formats_outside_the_allowlist_are_refused(fmt):
    data = _encoded(_photo(), fmt)
    Image.open(io.BytesIO(data)).load()  # Pillow itself reads it
    with pytest.raises(ImageError, match="not an image in an accepted format"):
        open_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_the_allowed_formats_decode(fmt):
    assert open_image(_encoded(_photo(), fmt)).size == (80, 60)


def test_upright_applies_the_exif_orientation_after_the_reduction():
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored turned: shown 90 degrees clockwise
    buffer = io.BytesIO()
    _photo((1600, 1200)).save(buffer, format="JPEG", exif=exif)
    assert open_image(buffer.getvalue(), max_side=640).size == (640, 480)
    assert open_image(buffer.getvalue(), max_side=640, upright=True).size == (480, 640)


def test_an_rgba_image_is_reduced_as_its_rgb_copy_would_be():
    # The alpha is dropped either way; reducing before dropping it never makes a full-size copy.
    image = _photo((2000, 1500), "RGBA")
    reduced = open_image(_encoded(image, "PNG"), max_side=200)
    expected = open_image(_encoded(image.convert("RGB"), "PNG"), max_side=200)
    assert reduced.size == expected.size == (200, 150)
    difference = torch.tensor(list(reduced.getdata())) - torch.tensor(list(expected.getdata()))
    assert difference.abs().max() <= 2
