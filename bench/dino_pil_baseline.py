"""The original DINO data pipeline, for comparison: `DataAugmentationDINO` per image in DataLoader workers.

facebookresearch/dino's main_dino.py builds its multi-crop augmentation from torchvision transforms on
PIL images. torchvision does not import with this project's torch wheel, so this is a port of the same
pipeline to PIL (ImageEnhance / ImageFilter / ImageOps, which torchvision calls for PIL images) and
torch, with DINO's probabilities and order:

    flip (p 0.5) -> ColorJitter(0.4, 0.4, 0.2, 0.1) (p 0.8, the four ops in a random order) ->
    grayscale (p 0.2) -> GaussianBlur (PIL radius U(0.1, 2); p 1.0 / 0.1 / 0.5 for global 1 / global 2 /
    local) -> solarize (p 0.2, global 2 only) -> ToTensor + Normalize(ImageNet)

after RandomResizedCrop(224 or 96, scale (0.4, 1) or (0.05, 0.4), bicubic). As in torchvision:
brightness / contrast / saturation are ImageEnhance.Brightness / Contrast / Color, hue shifts the H
channel of PIL's HSV conversion in uint8, grayscale is convert("L") back to RGB, the crop box follows
RandomResizedCrop's algorithm with Python's `random`. Used by bench/bench_data.py only.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dinovmf.data.augment import IMAGENET_MEAN, IMAGENET_STD

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop.get_params + resized_crop (bicubic), on a PIL image."""
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's F.adjust_hue for PIL images: shift H in uint8 HSV."""
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.uint8(int(factor * 255) % 256)  # wraps around the hue circle, as torchvision's uint8 add
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) -> Image.Image:
    """torchvision's ColorJitter on a PIL image: the four ops in a random order."""
    ops = [lambda im: ImageEnhance.Brightness(im).enhance(random.uniform(max(0, 1 - brightness), 1 + brightness)),
           lambda im: ImageEnhance.Contrast(im).enhance(random.uniform(max(0, 1 - contrast), 1 + contrast)),
           lambda im: ImageEnhance.Color(im).enhance(random.uniform(max(0, 1 - saturation), 1 + saturation)),
           lambda im: adjust_hue(im, random.uniform(-hue, hue))]
    for i in torch.randperm(4).tolist():
        img = ops[i](img)
    return img


def flip_and_color_jitter(img: Image.Image) -> Image.Image:
    if random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if random.random() < 0.8:
        img = color_jitter(img)
    if random.random() < 0.2:
        img = img.convert("L").convert("RGB")
    return img


def gaussian_blur(img: Image.Image, p: float) -> Image.Image:
    if random.random() < p:
        img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    return img


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return (x - _MEAN) / _STD


class DataAugmentationDINO:
    """DINO's main_dino.DataAugmentationDINO (global_crops_scale=(0.4, 1), local_crops_scale=(0.05, 0.4),
    local_crops_number=10), PIL-only."""

    def __init__(self, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), local_crops_number: int = 10):
        self.global_scale, self.local_scale, self.n_local = global_scale, local_scale, local_crops_number

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [to_normalized_tensor(gaussian_blur(flip_and_color_jitter(
            random_resized_crop(image, 224, self.global_scale)), 1.0))]
        img = gaussian_blur(flip_and_color_jitter(random_resized_crop(image, 224, self.global_scale)), 0.1)
        if random.random() < 0.2:
            img = ImageOps.solarize(img)
        crops.append(to_normalized_tensor(img))
        for _ in range(self.n_local):
            crops.append(to_normalized_tensor(gaussian_blur(flip_and_color_jitter(
                random_resized_crop(image, 96, self.local_scale)), 0.5)))
        return crops


class ImageFiles(torch.utils.data.Dataset):
    """JPEG files -> DINO's 12 normalised crops (as torchvision's ImageFolder + the transform)."""

    def __init__(self, files, transform=None):
        self.files, self.transform = list(files), transform or DataAugmentationDINO()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), 0
