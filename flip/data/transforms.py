"""Image transforms: PIL image -> normalised float tensor (3, H, W).

``train_transform``: random-resized crop (+ optional horizontal flip), as in CLIP/FLIP.
``eval_transform``: resize the short side + centre crop.
``to_normalized_tensor``: no geometry at all, for synthetic data whose captions
describe positions ("on the left") that crops or flips would make false.

Every pipeline first converts its input to RGB with ``flip.data.images.to_rgb`` (the
conversion the decoders use: transparency composited over white, 16-bit scaled), so
greyscale, palette or RGBA images come out with three channels, the same in training and
evaluation. All pieces are picklable (DataLoader workers).
"""
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from flip.data.images import to_rgb

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
