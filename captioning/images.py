"""Reading and preparing images: the one preprocessing shared by feature caching,
fine-tuning, evaluation and serving.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Iterable, Union

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Larger images are refused: a tiny compressed file can decode to gigabytes
# (a "decompression bomb"). 40 megapixels covers every real photo we caption.
MAX_PIXELS = 40_000_000
# Serving decodes no larger than this long side: twice the largest encoder input (320 px,
# encoder "lite2_320"), so the resize to the encoder's size still averages over real pixels,
# while a 40 MP upload costs about 1 MB instead of 120 MB once decoded.
DECODE_SIDE = 640
# The formats decoded at all: the common photo and web formats. Pillow can open dozens more
# (TIFF with its many codecs, PSD, EPS through Ghostscript, ...), each a decoder exposed to
# every upload; none of them is needed to caption a photo. The JPEGs of many phone cameras
# (MPO: a JPEG with extra pictures appended) open as JPEG. GIF and BMP stay for old web images.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# EXIF orientation -> the transpose that makes the picture upright (as PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

ImageSource = Union[bytes, bytearray, str, Path, Image.Image]


class ImageError(ValueError):
    """An input that cannot be used as an image (says which and why)."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return f"image file {str(source)!r}"
    if isinstance(source, (bytes, bytearray)):
        return f"image data ({len(source)} bytes)"
    return "image"


def open_image(source: ImageSource, max_side: int | None = None, upright: bool = False) -> Image.Image:
    """Decode an image fully and return it as RGB.

    With `max_side`, an image whose long side is larger comes back reduced to that long side
    (aspect ratio kept); a JPEG is then decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft
    mode), so its full-size pixels never exist in memory. With `upright`, the EXIF
    orientation is applied (to the reduced image: it costs nothing more).

    Raises ImageError for empty input, missing files, formats outside ALLOWED_FORMATS,
    truncated files and images larger than MAX_PIXELS.
    """
    if isinstance(source, Image.Image):
        return _reduce(_check_size(source, "image"), max_side).convert("RGB")
    name = _describe(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name} does not exist")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise ImageError(f"cannot read an image from {type(source).__name__}")
    if not data:
        raise ImageError(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            # PIL warns before its own bomb check; we turn both into ImageError.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                _check_size(image, name)
                turn = _UPRIGHT.get(_orientation(image)) if upright else None
                _draft(image, max_side)
                image.load()  # decode now, so a truncated file fails here
                reduced = _reduce(image, max_side).convert("RGB")
                return reduced.transpose(turn) if turn is not None else reduced
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageError(f"{name} is too large to decode safely: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated").
        raise ImageError(f"{name} is corrupt or truncated: {error}") from None


def _check_size(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name} is {width}x{height} = {width * height} pixels, more than MAX_PIXELS={MAX_PIXELS}")
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1, upright, when absent or unreadable); reads the header only."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, ValueError, TypeError, SyntaxError):
        return 1


def _reduced_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _draft(image: Image.Image, max_side: int | None) -> None:
    """Ask the decoder for a smaller image (JPEG only; other formats ignore it)."""
    if max_side and max(image.size) > max_side:
        # Asking with the image's own aspect ratio lets a long panorama shrink too.
        image.draft(image.mode, _reduced_size(image.size, max_side))


def _reduce(image: Image.Image, max_side: int | None) -> Image.Image:
    """The image with its long side at most `max_side` (the same image when it already is)."""
    if not max_side or max(image.size) <= max_side:
        return image
    if image.mode in ("RGBA", "LA"):
        # Box-average to at least twice the target first, one colour channel at a time (the alpha
        # is dropped anyway): Pillow's own reduce and resize of an image with alpha go through a
        # premultiplied copy at full size, 160 MB more for a 40 MP RGBA PNG; one channel is 40 MB.
        factor = max(image.size) // (2 * max_side)
        if factor > 1:
            bands = image.getbands()[:-1]
            image = Image.merge("".join(bands), [image.getchannel(band).reduce(factor) for band in bands])
    if image.mode not in ("RGB", "L"):
        # Palette and 1-bit images would be resampled by nearest neighbour: convert first.
        image = image.convert("RGB")
    return image.resize(_reduced_size(image.size, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)


def resize(image: Image.Image, size: int) -> Image.Image:
    """Squash to size x size (the whole picture is kept; captions speak about all of it)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def to_tensor(image: Image.Image, size: int, mean: float = 0.5, std: float = 0.5):
    """One image to a normalised (3, size, size) float tensor."""
    import numpy as np
    import torch

    array = np.asarray(resize(image.convert("RGB"), size), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return (tensor - mean) / std


def views(images: list[Image.Image], flip: bool) -> list[list[Image.Image]]:
    """The images as they are, and with `flip` also mirrored left to right (`decoding.flip`)."""
    return [images, [ImageOps.mirror(image) for image in images]] if flip else [images]


def preprocess(images: Iterable[ImageSource], size: int, mean: float = 0.5, std: float = 0.5):
    """Images (bytes, paths or PIL images) to a (B, 3, size, size) tensor for the encoder.

    EfficientNet-Lite expects inputs in [-1, 1]: mean = std = 0.5.
    """
    import torch

    tensors = [to_tensor(open_image(item), size, mean, std) for item in images]
    if not tensors:
        return torch.empty(0, 3, size, size)
    return torch.stack(tensors)
