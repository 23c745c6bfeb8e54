"""Image transforms: PIL image -> normalised float tensor (3, H, W), and the loader's
uint8 route to the same.

``train_transform``: random-resized crop (+ optional horizontal flip), as in CLIP/FLIP.
``eval_transform``: resize the short side + centre crop.
``to_normalized_tensor``: no geometry at all, for synthetic data whose captions
describe positions ("on the left") that crops or flips would make false.
``DecodeRandomResizedCrop``: ``train_transform``'s augmentation straight from encoded
bytes to a uint8 tensor, for the webdataset loader (``flip.data.shards``), whose batches
are normalised on the device by ``normalize`` (the DataModule's ``on_after_batch_transfer``).

Every pipeline first converts its input to RGB with ``flip.data.images.to_rgb`` (the
conversion the decoders use: transparency composited over white, 16-bit scaled), so
greyscale, palette or RGBA images come out with three channels, the same in training and
evaluation. All pieces are picklable (DataLoader workers).
"""

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from flip.data.images import DEFAULT_MAX_PIXELS, decode_image, to_rgb

try:  # optional (requirements.txt): faster JPEG decoding, the same pixels
    import simplejpeg
except ImportError:
    simplejpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_normalized_tensor() -> T.Compose:
    """PIL -> float tensor (3, H, W) normalised with the ImageNet mean/std."""
    return T.Compose([to_rgb, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(
    image_size: int, scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True
) -> T.Compose:
    """RandomResizedCrop(image_size, scale, bicubic) [+ horizontal flip] + normalise."""
    steps = [
        to_rgb,
        T.RandomResizedCrop(
            image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC
        ),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_transform(image_size: int) -> T.Compose:
    """Resize the short side to image_size (bicubic), centre crop square, normalise."""
    return T.Compose(
        [
            to_rgb,
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float normalised with the ImageNet mean/std.

    The same operations, in the same order, as ``T.ToTensor()`` + ``T.Normalize``, so the
    result is bit-identical to theirs on the same pixels, on whichever device ``images`` is.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


DRAFT_SCALES = (8, 4, 2)  # the reduced sizes libjpeg decodes to directly: 1/8, 1/4, 1/2
# JPEG colour spaces simplejpeg turns into RGB, with the mode PIL gives such a file; the
# rest (CMYK, YCCK) go through PIL, which knows Adobe's inverted CMYK
_SIMPLEJPEG_MODES = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "L"}


class DecodeRandomResizedCrop:
    """Encoded image -> ``train_transform``'s augmentation as a uint8 tensor (3, S, S).

    ``decode(data, max_pixels)`` (an instance ``decode``) returns ``(image, original
    mode)`` and raises ``flip.data.images.BadSample`` like ``decode_image``. The augmentation is
    torchvision's: ``RandomResizedCrop.get_params`` draws the crop and ``torch.rand(1) <
    0.5`` the flip, in ``train_transform``'s order, so a seed gives the same crop and flip
    as there. What changes is the order of work, which is where a loader's time goes
    (experiments/benchmark_loader.py):

    * the crop is drawn from the header's size, before any pixel is decoded; when the
      crop is at least 2, 4 or 8 times ``size`` on its shorter side, a JPEG is decoded at
      1/2, 1/4 or 1/8 scale (libjpeg scales in the DCT, nearly for free) and the crop is
      taken from that, its edges rounded to the reduced pixel grid (at most ``scale / 2``
      original pixels, under half an output pixel). The crop still has at least ``size``
      pixels a side, so the final resize only ever shrinks, as it would from the full
      decode; tests/test_loader_semantics.py bounds the pixel difference.
    * JPEGs are decoded by simplejpeg when it is installed (libjpeg-turbo straight into a
      numpy array, without PIL's per-image overhead and copies; the same library and
      settings as PIL's decoder, so the same pixels), else by PIL (``Image.draft`` for the
      reduced sizes). Other formats, CMYK JPEGs and anything simplejpeg rejects go through
      PIL (``decode_image``), which names the reason when an image is bad.
    * crop and bicubic resize are one antialiased resize of a uint8 tensor
      (``torchvision.transforms.v2.functional.resized_crop``, torch's vectorised uint8
      kernel; the same filter as PIL's bicubic, within a grey level or two, several
      times faster than PIL's);
    * no float conversion and no normalisation here: uint8 batches are a quarter of the
      bytes to stack, hand between processes and copy to the device, and ``normalize``
      runs on the device (``ShardDataModule.on_after_batch_transfer``).

    ``draft=False`` decodes every image at full size (the crop box is then exactly
    torchvision's).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        draft: bool = True,
    ):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.hflip, self.draft = hflip, draft

    def draft_scale(self, height: int, width: int) -> int:
        """The largest JPEG reduction that leaves a (height, width) crop ``size`` a side."""
        if self.draft:
            for scale in DRAFT_SCALES:
                if min(height, width) >= scale * self.size:
                    return scale
        return 1

    def __call__(
        self, data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> tuple[torch.Tensor, str]:
        crop = []  # (top, left, height, width): drawn once per image, by whichever decoder

        def draw(height: int, width: int) -> tuple[int, int, int, int]:
            if not crop:  # get_params reads only the size of what it is given
                shape_only = torch.empty(()).expand(height, width)
                crop.extend(T.RandomResizedCrop.get_params(shape_only, self.scale, self.ratio))
            return crop

        decoded = self._simplejpeg(data, max_pixels, draw) if simplejpeg is not None else None
        pixels, mode, scale = decoded or self._pil(data, max_pixels, draw)
        top, left, height, width = crop
        if scale > 1:  # the crop's edges on the reduced pixel grid
            top, bottom = round(top / scale), round((top + height) / scale)
            left, right = round(left / scale), round((left + width) / scale)
            height, width = bottom - top, right - left
        out = TF.resized_crop(
            pixels,
            top,
            left,
            height,
            width,
            [self.size, self.size],
            InterpolationMode.BICUBIC,
            antialias=True,
        )
        if self.hflip and torch.rand(1) < 0.5:
            out = TF.horizontal_flip(out)
        return out, mode

    def _simplejpeg(self, data: bytes, max_pixels: int | None, draw):
        """(pixels (3, H, W), mode, scale) by simplejpeg, or None to leave it to PIL."""
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # not a JPEG (or a broken one)
            return None
        limit = max_pixels if max_pixels is not None else 2 * Image.MAX_IMAGE_PIXELS
        if colorspace not in _SIMPLEJPEG_MODES or width * height > limit:
            return None  # PIL converts it, or raises large_image naming the limit
        scale = self.draft_scale(*draw(height, width)[2:])
        try:  # exactly 1/scale: the smallest libjpeg size with at least these dimensions
            pixels = simplejpeg.decode_jpeg(
                data,
                "RGB",
                min_height=-(-height // scale),
                min_width=-(-width // scale),
                min_factor=scale,
            )
        except ValueError:  # truncated or corrupt: PIL decides, and names it
            return None
        return torch.from_numpy(pixels).permute(2, 0, 1), _SIMPLEJPEG_MODES[colorspace], scale

    def _pil(self, data: bytes, max_pixels: int | None, draw):
        """(pixels (3, H, W), mode, scale) by PIL; BadSample for a bad image."""
        scale = 1

        def plan(img: Image.Image) -> None:  # header read, nothing decoded yet
            nonlocal scale
            scale = self.draft_scale(*draw(img.height, img.width)[2:])
            if scale > 1:  # Image.draft returns None for formats without reduced decoding
                full_width = img.width
                drafted = img.draft(img.mode, (img.width // scale, img.height // scale))
                scale = round(full_width / drafted[1][2]) if drafted is not None else 1

        image, mode = decode_image(data, max_pixels, before_load=plan)
        return TF.pil_to_tensor(image), mode, scale
