"""Simulated VQA-HAT annotators: one annotator's attention map of a question, made from its
ground-truth objects in the instance map."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from pipeline.data.synthetic.scenes import SIZES


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate a 2-D array by (dx, dy) pixels, filling with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def _hat_map(
    rng: np.random.Generator, instances: np.ndarray, object_indices: list[int], hat: Mapping[str, Any]
) -> np.ndarray:
    """One simulated annotator's attention map (uint8, hat.size square).

    The question's ground-truth mask, minus (with probability ``miss_probability``) one needed
    object when several are needed, shifted by a random jitter, plus up to ``spurious_blobs``
    random blobs elsewhere; downsampled to the map size, plus pixel noise, Gaussian-blurred with
    a sigma drawn from ``blur_sigma`` (image pixels, scaled to the map), rescaled to 0..255.
    """
    image_size = instances.shape[0]
    kept = list(object_indices)
    if len(kept) > 1 and rng.random() < hat["miss_probability"]:
        kept.pop(int(rng.integers(len(kept))))
    # Lookup table from instance label to attention (label k + 1 is object k).
    table = np.zeros(256, dtype=np.float32)
    table[np.asarray(kept, dtype=np.int64) + 1] = 1.0
    jitter = int(hat["jitter"])
    attention = _shift(table[instances], *(int(v) for v in rng.integers(-jitter, jitter + 1, size=2)))
    coords = np.arange(image_size, dtype=np.float32)
    for _ in range(int(rng.integers(int(hat["spurious_blobs"]) + 1))):
        cx, cy = rng.uniform(0, image_size, size=2)
        radius = rng.uniform(SIZES["small"], SIZES["large"]) * image_size
        inside = (coords[None, :] - cx) ** 2 + (coords[:, None] - cy) ** 2 <= radius**2
        attention[inside] = np.maximum(attention[inside], rng.uniform(0.3, 0.8))
    size = int(hat["size"])
    scale = size / image_size
    small = np.asarray(Image.fromarray(attention).resize((size, size), Image.BOX), dtype=np.float64)
    sigma = rng.uniform(*hat["blur_sigma"]) * scale
    # Noise goes in *before* the blur: a person's deblurring strokes are smooth, so their
    # disagreement is spatially smooth too, not independent per pixel (which would make the
    # flat background rank at random and sink inter-annotator agreement far below VQA-HAT's).
    small += rng.normal(0.0, hat["noise"], size=small.shape)
    small = gaussian_filter(small, sigma)
    small -= small.min()
    peak = small.max()
    if peak > 0:
        small *= 255.0 / peak
    return np.rint(small).astype(np.uint8)
