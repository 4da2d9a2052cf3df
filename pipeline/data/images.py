"""Images as the models see them: RGB, resized to the backbone's input size, normalised."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.data.vqa_format import load_image


class ImageTransform:
    """PIL image -> normalised float tensor 3 x S x S (bilinear resize when the size differs)."""

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float]):
        self.input_size = int(input_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.input_size, self.input_size):
            image = image.resize((self.input_size, self.input_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] RGB, for overlays."""
        return (images * self.std.to(images) + self.mean.to(images)).clamp(0, 1)


class ImageFolderDataset(Dataset):
    """The images of a split (``[{image_id, image}]`` from the processed data) under ``root``."""

    def __init__(self, root: str | Path, images: list[dict], transform: ImageTransform):
        self.root = Path(root)
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.transform(load_image(self.root / self.images[index]["image"]))
