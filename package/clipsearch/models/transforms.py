"""Image preprocessing shared by all variants: one definition, parameterised by size and normalisation."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# What the training crop draws, recorded in the identity of an image cache (image_cache.py): caches
# drawn before crops came from the centred square are remade rather than reused.
TRAIN_CROP = "random 80-100% of the centred square"


class CenterSquare:
    """The centred square of side min(width, height): what evaluation's resize and centre crop keep."""

    def __call__(self, image):
        return TF.center_crop(image, [min(image.size)] * 2)


def make_image_transform(size: int, mean, std, is_train: bool):
    """PIL RGB image -> normalised FloatTensor [3, size, size].

    Training uses a mild random resized crop of the centred square that evaluation sees; a run
    mirrors images only when asked (`with_random_mirror`, the --flip_images flag).

    Why the square first: a crop of 80-100% of a 4:3 photo's area with an aspect ratio near 1 does not
    fit inside it, and torchvision then falls back to one fixed, squashed centre crop (9 draws in 10
    on a 500x375 photo), so training on ordinary photos saw no random crop at all. Square images
    (Flickr8k's copies here, the generated sample data) draw exactly the crops they drew before.
    """
    normalize = T.Normalize(mean=tuple(mean), std=tuple(std))
    if is_train:
        return T.Compose([
            CenterSquare(),
            T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            normalize,
        ])
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        normalize,
    ])


def with_random_mirror(transform):
    """`transform` applied to a left-right mirror of the image half of the time.

    Mirroring before the random crop draws the same crops, mirrored. Captions that say "left" or
    "right" become wrong on the mirrored half, which is why it is a flag: 116 of Flickr8k's 30,000
    training captions name a side.
    """
    return T.Compose([T.RandomHorizontalFlip(p=0.5), transform])


class PixelNormalize:
    """The float step of an image transform, applied to a whole batch of uint8 pixels at once.

    Why: a loader worker that ships uint8 pixels moves a quarter of the bytes across processes (and
    to a GPU), and skips ToTensor and Normalize's passes over each image. The batch then gets the
    same operations in the same order, `(pixels / scale - mean) / std` in float32, so it equals,
    bit for bit, the stack of what the whole transform gives image by image.
    """

    def __init__(self, mean, std, scale: float = 255.0):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = float(scale)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.mean.device != pixels.device:  # once: the model's device stays the same
            self.mean, self.std = self.mean.to(pixels.device), self.std.to(pixels.device)
        images = pixels.float()
        if self.scale != 1.0:
            images.div_(self.scale)
        return images.sub_(self.mean).div_(self.std)


def split_normalize(transform: Callable) -> tuple[Callable, PixelNormalize | None]:
    """(PIL image -> uint8 pixels, their batch normalisation), together equal to `transform`; or
    (`transform`, None) when its last steps are not a conversion known to split.

    Splits torchvision pipelines ending in ToTensor (or open_clip's MaybeToTensor) and Normalize,
    pipelines whose last step is such a pipeline (`with_random_mirror`'s), and transforms that say how
    to split themselves (`split_normalize()`, the HuggingFace processor's).
    """
    own_split = getattr(transform, "split_normalize", None)
    if own_split is not None:
        return own_split()
    steps = transform.transforms if isinstance(transform, T.Compose) else None
    if not steps:
        return transform, None
    if len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and type(steps[-1]) is T.Normalize:
        normalize = steps[-1]
        return T.Compose([*steps[:-2], T.PILToTensor()]), PixelNormalize(normalize.mean, normalize.std)
    last_pixels, normalize = split_normalize(steps[-1])
    if normalize is None:
        return transform, None
    return T.Compose([*steps[:-1], last_pixels]), normalize
