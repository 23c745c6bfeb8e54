"""Image files: which suffixes are images, decoding untrusted bytes and captions into
training inputs (or a named reason why not), and the one conversion to RGB.

``IMAGE_EXTENSIONS`` are the file suffixes read as images everywhere (image folders, shard
members, evaluation sets); ``to_rgb`` is the conversion every pipeline applies, in
training and in evaluation.

``decode_image`` and ``decode_caption`` raise ``BadSample(reason, detail)`` for input that
must be skipped; the callers count the reason (see ``flip.data.quality``). Reasons:

* ``empty_image``: a zero-byte image file.
* ``corrupt_image``: not an image PIL can identify, or one that fails to decode
  (truncated JPEG, bad Huffman data, ...).
* ``large_image``: width x height above ``max_pixels`` (decompression-bomb guard; checked
  from the header, before any pixel is decoded).
* ``empty_caption``: a caption that is empty or only white space.

Images that are valid but not RGB are *converted*, not skipped (``to_rgb``): greyscale,
CMYK, 16-bit and palette images become RGB; images with transparency (RGBA, LA, PA,
palette or greyscale with a transparent colour) are composited over white, so transparent
pixels do not turn into whatever colour they happen to store (often black).
"""

import io
import os
import warnings
from collections.abc import Callable

from PIL import Image

# lower case: compare with ``path.suffix.lower()``; shard members use them without the dot
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own warning threshold: 89,478,485
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadSample(Exception):
    """An input that must be skipped; ``reason`` names why (one of the documented reasons)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as mode RGB; transparency is composited over a white background."""
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16/32-bit greyscale: scale the used range to 8 bits (convert("RGB") would clip)
        lo, hi = img.getextrema()
        scale = 255 / (hi - lo) if hi > lo else 0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    return img.convert("RGB")


def decode_image(
    data: bytes | os.PathLike | str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    before_load: Callable[[Image.Image], None] | None = None,
) -> tuple[Image.Image, str]:
    """(the image as RGB, its original mode) from bytes or a path; BadSample otherwise.

    ``before_load(img)`` runs once the header is read and checked, before any pixel is
    decoded: it sees the full size and may ask for a reduced-size decode (``img.draft``,
    JPEG only; ``flip.data.transforms.DecodeRandomResizedCrop`` does). A missing path
    raises FileNotFoundError (the caller decides what it means).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise BadSample("empty_image", "0 bytes")
        source = io.BytesIO(data)
    else:
        if os.path.getsize(data) == 0:  # FileNotFoundError propagates
            raise BadSample("empty_image", "0 bytes")
        source = data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels rules
            with Image.open(source) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise BadSample("large_image", f"{width}x{height} > max_pixels={max_pixels}")
                if before_load is not None:
                    before_load(img)
                img.load()  # the full decode happens here, inside the try
                return to_rgb(img), img.mode
    except Image.DecompressionBombError as err:  # above PIL's own limit (2x MAX_IMAGE_PIXELS)
        raise BadSample("large_image", str(err)) from None
    except Image.UnidentifiedImageError:
        raise BadSample("corrupt_image", "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadSample("corrupt_image", str(err) or type(err).__name__) from None


def decode_caption(data: bytes | str) -> str:
    """The caption as text (invalid UTF-8 replaced, outer white space stripped)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, (bytes, bytearray)) else data
    text = text.strip()
    if not text:
        raise BadSample("empty_caption", "no text")
    return text
