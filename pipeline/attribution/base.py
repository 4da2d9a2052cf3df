"""What every attribution method returns and the context it works in.

A method is a function ``method(ctx) -> Explanation`` registered under a name with
:func:`register`; it talks to the model only through ``ctx`` (the shared :class:`Probe` and the
passes cached on it), so it never knows which model it explains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as nnf

from pipeline.attribution.probe import Probe
from pipeline.models.folding import folded_backbone


@dataclass
class Explanation:
    """One method's answer for a batch.

    ``image_map``: B x H x W importance at input resolution (signed where the method's is:
    occlusion's probability drops, CAM; evaluation takes |map| as Goyal et al.); ``image_map_raw``: the
    map at the method's native resolution (a conv grid, signed pixel gradients...);
    ``question_map``: B x T, one score per token (0 on padding); ``extras``: what the method
    records on the side (answer flips, neuron rankings, glimpses). ``skipped`` holds the reason
    when the method does not apply to this model; then there are no maps at all."""

    method: str
    image_map: torch.Tensor | None = None
    image_map_raw: torch.Tensor | None = None
    question_map: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0  # wall time of this method in its ``explain`` call (shared passes count
                          # for the first method that needed them)


class NotApplicable(Exception):
    """The method does not apply to this model (the message says why)."""


MethodFn = Callable[["ExplainContext"], Explanation]
METHODS: dict[str, MethodFn] = {}
# Methods that backpropagate again through the shared gradient pass's graph: when none of them
# is requested, that pass frees its graph in its one backward (keeping it costs ~10% on CPU,
# where freed buffers are reused by the next batch).
REUSES_SHARED_GRAPH: set[str] = set()

SCORES = ("logit", "probability")
# The score a method differentiates, as its paper defines it (docs/fidelity.md): Goyal et al.
# take "the probability of predicted answer" for guided backprop (section 3); Grad-CAM the score
# before the softmax (Eq. 1), and so do its variants; methods not listed take the logit.
PAPER_SCORES = {"guided_backprop": "probability"}
DEFAULT_SCORE = "logit"


def method_score(options: dict, method: str | None) -> str:
    """The score ``method`` differentiates: its own ``options[method]["score"]``, else a global
    ``options["score"]`` (one kind forced on every method), else the paper's choice."""
    own = (options.get(method) or {}).get("score") if method else None
    kind = own or options.get("score") or PAPER_SCORES.get(method, DEFAULT_SCORE)
    if kind not in SCORES:
        raise ValueError(f"attribution score must be one of {SCORES}, got {kind!r}"
                         + (f" (method {method})" if method else ""))
    return kind


def answer_scores(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Each example's score of its target answer (B): the logit y^c (Grad-CAM, Selvaraju et al.
    Eq. 1: "the score for class c, y^c (before the softmax)"), or the softmax probability
    (Goyal et al. section 3). Every score an attribution starts from is this one."""
    if kind not in SCORES:
        raise ValueError(f"attribution score must be one of {SCORES}, got {kind!r}")
    values = logits if kind == "logit" else torch.softmax(logits, dim=1)
    return values.gather(1, target[:, None])[:, 0]


def upsample_maps(maps: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """B x h x w -> B x H x W (``size`` = (H, W)): how the attribute stage brings conv-resolution
    maps to input resolution (``attribution.upsample``: bilinear, nearest...). Studies that
    upsample maps themselves call this too, so that theirs are the store's to the bit.
    ``align_corners=False`` (pixel centres) for the modes that take it; nearest takes none."""
    return nnf.interpolate(maps[:, None], size=tuple(size), mode=mode,
                           **({"align_corners": False} if mode in ("bilinear", "bicubic") else {}))[:, 0]


def register(name: str, reuses_shared_graph: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as method ``name``. ``reuses_shared_graph``: the method differentiates
    the shared gradient pass's probe again (``ctx.gradient_pass()[0].grad(...)``)."""
    def add(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"attribution method {name!r} registered twice")
        METHODS[name] = fn
        if reuses_shared_graph:
            REUSES_SHARED_GRAPH.add(name)
        return fn
    return add


class ExplainContext:
    """The inputs of one ``explain`` call and the passes that methods share."""

    def __init__(self, model, images: torch.Tensor, tokens: torch.Tensor,
                 target: torch.Tensor | None, options: dict | None = None,
                 methods: Sequence[str] | None = None):
        self.model = model
        self.images = images
        self.tokens = tokens
        self.options = options or {}
        self._target = target
        self._cache: dict = {}
        # Unknown (None): keep the shared graph, any method may come back to it.
        self.keep_shared_graph = methods is None or any(m in REUSES_SHARED_GRAPH for m in methods)
        # Scores the shared guided graph will be differentiated for: its backward keeps the graph
        # while another score is still to come (one forward serves a logit and a probability).
        self._scores_to_come = (set(SCORES) if methods is None
                                else {method_score(self.options, m) for m in methods})

    def option(self, method: str, key: str, default):
        return self.options.get(method, {}).get(key, default)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def token_mask(self) -> torch.Tensor:
        return self.tokens != 0

    @property
    def target(self) -> torch.Tensor:
        """The explained answer of each question: given, or the model's prediction."""
        if self._target is None:
            if "guided_probe" in self._cache:
                self._target = self._cache["guided_probe"].logits.argmax(1).detach()
            else:  # a plain forward: methods without gradients need no backward for this
                with torch.no_grad():
                    self._target = self.model(self.images, self.tokens).argmax(1)
        return self._target

    def score(self, logits: torch.Tensor, method: str | None = None,
              per_example: bool = False) -> torch.Tensor:
        """The target answers' scores (:func:`answer_scores`: the logit or the softmax
        probability, as :func:`method_score` picks for ``method``), summed over the batch:
        examples are independent in eval mode, so one backward of the sum holds every example's
        own gradient. ``per_example=True``: the B scores themselves (integrated gradients'
        completeness check compares each example's F(x) - F(x'), Sundararajan et al. section 3)."""
        scores = answer_scores(logits, self.target, method_score(self.options, method))
        return scores if per_example else scores.sum()

    def guided_probe(self) -> Probe:
        """The shared forward pass, with guided ReLUs (their backward passes only positive
        gradient; the forward is the model's own). Methods that only read activations use it."""
        if "guided_probe" not in self._cache:
            probe = Probe(self.model, self.images, self.tokens, guided=True)
            if self._target is None:
                self._target = probe.logits.argmax(1).detach()
            self._cache["guided_probe"] = probe
        return self._cache["guided_probe"]

    def gradient_pass(self, method: str | None = None) -> tuple[Probe, dict[str, torch.Tensor]]:
        """One backward of ``method``'s score (:func:`method_score`) through the shared guided
        forward: gradients at ``image``, ``conv`` and ``q_emb``. Grad-CAM, guided backprop and
        Guided Grad-CAM share it; a second score kind costs a second backward, no forward."""
        kind = method_score(self.options, method)
        key = ("gradient", kind)
        if key not in self._cache:
            probe = self.guided_probe()
            names = [n for n in ("image", "conv", "q_emb") if n in probe]
            self._scores_to_come.discard(kind)
            retain = self.keep_shared_graph or bool(self._scores_to_come)
            grads = probe.grad(self.score(probe.logits, method), names, retain_graph=retain)
            self._cache[key] = (probe, dict(zip(names, grads)))
        return self._cache[key]

    def plain_conv_gradient(self, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, dy/dA) at the ``conv`` point for ``method``'s score. Taken from the shared guided
        pass when no ReLU follows ``conv`` (guided ReLUs then cannot touch it), else from a
        plain pass."""
        probe = self.guided_probe()
        if "conv" not in probe:
            raise NotApplicable("the model has no 'conv' analysis point")
        if not probe.relu_after("conv"):
            probe, grads = self.gradient_pass(method)
            return probe["conv"], grads["conv"]
        key = ("plain_conv", method_score(self.options, method))
        if key not in self._cache:
            plain = Probe(self.model, self.images, self.tokens, guided=False)
            self._cache[key] = (plain["conv"], plain.grad(self.score(plain.logits, method), ["conv"])[0])
        return self._cache[key]

    def inference_backbone(self, fold_batchnorm: bool = True) -> torch.nn.Module:
        """The backbone with every BatchNorm folded into the convolution before it
        (:func:`pipeline.models.folding.folded_backbone`), for passes that need no gradient
        (occlusion's copies): the same function up to float rounding, and a fifth less time on
        CPU. ``fold_batchnorm=False`` gives the backbone as it is (bit-for-bit the model's own
        passes; folding changes features by float rounding, ~1e-6 relative)."""
        if not fold_batchnorm:
            return self.model.backbone
        return folded_backbone(self.model.backbone)

    def upsample(self, maps: torch.Tensor) -> torch.Tensor:
        """B x h x w -> B x H x W at input resolution (``upsample`` option: bilinear, nearest;
        :func:`upsample_maps`)."""
        return upsample_maps(maps, self.input_size, self.options.get("upsample", "bilinear"))
