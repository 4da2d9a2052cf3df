"""Attribution: one verb, ``explain``, for every method of the four papers.

    from pipeline.attribution import explain
    maps = explain(model, images, question_tokens, methods=["gradcam", "guided_backprop"])
    maps["gradcam"].image_map        # B x H x W
    maps["guided_backprop"].question_map   # B x T

A method is one short module in ``pipeline/attribution/methods/`` registered with
:func:`pipeline.attribution.base.register`; it reaches the model only through the shared probe.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from pipeline.attribution.base import METHODS, ExplainContext, Explanation, NotApplicable
import pipeline.attribution.methods  # noqa: F401  (imports and so registers every method)

log = logging.getLogger(__name__)

__all__ = ["explain", "explain_options", "available_methods", "Explanation"]

_skips_logged: set[tuple[str, str]] = set()


def available_methods() -> list[str]:
    return sorted(METHODS)


def explain_options(attribution, overrides=None) -> dict:
    """The ``options`` of :func:`explain` that an ``attribution`` config section sets: its
    per-method ``options``, with ``overrides`` (a stage's own per-method settings, such as
    ``evaluation.sanity_check.options``) merged over them key by key, and the shared ``score``
    and ``upsample``. Plain dicts, the config untouched."""
    from omegaconf import OmegaConf

    def plain(section) -> dict:
        return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)

    options = plain(attribution.options)
    for method, extra in plain(overrides or {}).items():
        options.setdefault(method, {}).update(extra or {})
    options.update(score=None if attribution.score is None else str(attribution.score),
                   upsample=str(attribution.upsample))
    return options


def explain(model, images: torch.Tensor, question_tokens: torch.Tensor,
            methods: Sequence[str] = ("gradcam",), target: torch.Tensor | None = None,
            options: dict | None = None) -> dict[str, Explanation]:
    """Explain ``model``'s answers to (images, question_tokens) with each of ``methods``.

    ``target`` (B,) picks the answer to explain per question; ``None`` explains the predicted
    one. ``options`` holds method settings by method name (``{"occlusion": {"grid": 16}}``) and
    the shared ``score`` ("logit" or "probability") and ``upsample`` mode. Methods requested
    together share passes. A method that does not apply to this model comes back with
    ``skipped`` set to the reason (and is logged), never as a zero map.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method(s) {unknown}; available: {available_methods()}")
    if model.training:
        raise ValueError("explain a model in eval mode (model.eval()): dropout and batch "
                         "statistics would make the maps random")
    ctx = ExplainContext(model, images, question_tokens, target, options, methods)
    results = {}
    # Gradient methods need autograd even when the caller runs under no_grad (as Lightning's
    # predict loop does); methods that need none use inference mode inside.
    with torch.enable_grad():
        for name in methods:
            start = time.perf_counter()
            try:
                results[name] = METHODS[name](ctx)
            except NotApplicable as e:
                if (name, str(e)) not in _skips_logged:  # once, not once per batch
                    _skips_logged.add((name, str(e)))
                    log.info("skipping %s: %s", name, e)
                results[name] = Explanation(name, skipped=str(e))
            results[name].seconds = time.perf_counter() - start
    return results
