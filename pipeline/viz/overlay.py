"""Heat-map overlays and token colours shared by every figure and the gallery.

Maps are shown as |map| (Goyal et al. rank |map| too) normalised to [0, 1] per map; a constant
map shows as all zero rather than as noise.
"""
from __future__ import annotations

import html

import numpy as np
from PIL import Image

from pipeline.data.vqa_format import load_image


def normalise(heat: np.ndarray, absolute: bool = True) -> np.ndarray:
    """``heat`` scaled to [0, 1] (min-max of |heat| by default); all zero if it is constant."""
    h = np.asarray(heat, dtype=np.float64)
    if absolute:
        h = np.abs(h)
    lo, hi = np.nanmin(h), np.nanmax(h)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(h)
    return (h - lo) / (hi - lo)


def colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """[0, 1] values -> uint8 RGB through a matplotlib colormap."""
    from matplotlib import colormaps

    rgba = colormaps[name](np.clip(values, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet",
            absolute: bool = True) -> np.ndarray:
    """uint8 RGB ``image`` (H x W x 3) blended with ``heat`` (any h x w, resized bilinearly to the
    image) coloured by ``cmap``: alpha * colour + (1 - alpha) * image."""
    height, width = image.shape[:2]
    h = normalise(heat, absolute)
    if h.shape != (height, width):
        h = np.asarray(Image.fromarray(h.astype(np.float32), mode="F").resize((width, height),
                                                                            Image.BILINEAR))
    blended = alpha * colormap(h, cmap).astype(np.float64) + (1 - alpha) * image.astype(np.float64)
    return blended.round().clip(0, 255).astype(np.uint8)


def display_image(data_root, image_path: str, size: int | None = None) -> np.ndarray:
    """The image as the model saw it (``size`` x ``size``, as ``ImageTransform`` resizes), uint8 RGB."""
    image = load_image(data_root / image_path)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"))


def token_colours(scores, cmap: str = "RdBu_r", limit: float | None = None) -> list[str]:
    """Hex colours of per-token scores on a diverging map centred at 0 (red = important,
    blue = negative); ``limit`` is the score shown at full colour (default: max |score|)."""
    s = np.asarray(scores, dtype=np.float64)
    limit = float(np.max(np.abs(s))) if limit is None and len(s) else (limit or 1.0)
    scaled = 0.5 + 0.5 * s / limit if limit > 0 else np.full_like(s, 0.5)
    return ["#%02x%02x%02x" % tuple(c) for c in colormap(scaled, cmap)]


def tokens_html(tokens: list[str], scores) -> str:
    """Question tokens as HTML spans with background colour by score (title = the score)."""
    colours = token_colours(scores)
    return " ".join(f'<span class="tok" style="background:{c}" title="{float(v):.3f}">'
                    f"{html.escape(t)}</span>" for t, c, v in zip(tokens, colours, scores))
