"""The library under the ``sanity_check`` stage: cascading model-parameter randomisation
(Adebayo et al. 2018, "Sanity checks for saliency maps", section 3.1 and Fig. 2).

The cascade is read off the model, with no model-class cases: the units are the children of the
model's top-level children (head, backbone), a container (``nn.Sequential`` / ``nn.ModuleList``)
whose children include blocks with parameters of their own being opened one level (so a
backbone's stages are units, while a stem of conv-BN-ReLU stays one unit); units without
parameters and units that never run in ``forward`` (a backbone's pretraining classifier) are left
out. Units are ordered by when they first run in one forward pass and randomised in the reverse
order, from the output (classifier) down to the input.

Randomising a unit redraws every parameter tensor p of it from N(mean(p), std(p)) (its own
trained mean and spread: weights get a fresh random matrix of the same scale, a BatchNorm gain
keeps its size around 1 instead of collapsing to 0), from a generator seeded by the run's seed and
the parameter's name, so a unit gets the same random weights whichever step randomises it.
BatchNorm running statistics are buffers (statistics of the data, not learned weights) and stay.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from pipeline.attribution.methods.random import NAME as RANDOM
from pipeline.evaluation.stats import spearman_rows

REFERENCE = RANDOM  # the map every other method of the sanity check must move further than

CONTAINERS = (nn.Sequential, nn.ModuleList)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_block(module: nn.Module) -> bool:
    """A module with sub-modules that hold parameters (a residual block, a stage)."""
    return any(_has_parameters(child) for child in module.children())


def candidate_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every unit a cascade may randomise, in registration order."""
    units = []
    for top_name, top in model.named_children():
        for name, child in top.named_children():
            if not _has_parameters(child):
                continue
            if isinstance(child, CONTAINERS) and any(_is_block(c) for c in child.children()):
                units += [(f"{top_name}.{name}.{n}", c) for n, c in child.named_children()
                          if _has_parameters(c)]
            else:
                units.append((f"{top_name}.{name}", child))
    return units


def cascade_units(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The units in cascade order: those that run in ``model(images, tokens)``, last to run
    first (the classifier) down to the first (the backbone's stem)."""
    units = candidate_units(model)
    first_call: dict[str, int] = {}

    def recorder(name: str):
        def record(module, inputs, output) -> None:  # returns None: the output stays as it is
            first_call.setdefault(name, len(first_call))
        return record

    handles = [module.register_forward_hook(recorder(name)) for name, module in units]
    try:
        with torch.no_grad():
            model(images, tokens)
    finally:
        for h in handles:
            h.remove()
    ran = [(name, module) for name, module in units if name in first_call]
    return sorted(ran, key=lambda unit: -first_call[unit[0]])


def parameter_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def randomise_unit(unit_name: str, module: nn.Module, seed: int) -> None:
    """Redraw every parameter of ``module`` (in place) from N(mean, std) of its trained values."""
    for name, p in module.named_parameters():
        generator = torch.Generator().manual_seed(parameter_seed(seed, f"{unit_name}.{name}"))
        values = p.detach().float()
        std = float(values.std(unbiased=False)) if p.numel() > 1 else 0.0
        fresh = torch.randn(p.shape, generator=generator) * std + float(values.mean())
        p.copy_(fresh.to(dtype=p.dtype, device=p.device))


def image_correlation(original: np.ndarray, randomised: np.ndarray) -> np.ndarray:
    """Spearman's rho between |original| and |randomised| maps per question (N x r x r each)."""
    n = len(original)
    return spearman_rows(np.abs(original).reshape(n, -1), np.abs(randomised).reshape(n, -1))


def question_correlation(original: np.ndarray, randomised: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Spearman's rho between |original| and |randomised| token scores per question, over its
    real (non-padding) tokens only (N x T each, ``real`` N x T bool); NaN when either is
    constant (e.g. a one-word question)."""
    out = np.full(len(original), np.nan)
    for i, mask in enumerate(np.asarray(real, dtype=bool)):
        if mask.sum() >= 2:
            out[i] = spearman_rows(np.abs(original[i][mask]), np.abs(randomised[i][mask]))
    return out
