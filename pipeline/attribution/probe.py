"""The shared probe: every attribution method reaches a model only through it.

A :class:`Probe` runs the model once with hooks on its analysis points (docs/analysis_points.md),
keeps each point's activation so that gradients can be taken with respect to it, and can switch
the model's ReLUs to guided backpropagation. Methods ask for gradients of a score with respect
to named points; they never see the model class. Work that several methods share (one forward
and one backward for the gradient family) is computed once per probe and cached.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as nnf
from torch import nn

from pipeline.models.analysis import analysis_points


class _GuidedGradient(torch.autograd.Function):
    """Identity forward; backward keeps only the positive part of the incoming gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def _guided_relu_output(module: nn.Module, inputs, output):
    # Guided backpropagation (Springenberg et al. 2015): the ReLU's own backward zeroes the
    # gradient where the forward input was negative; the identity node placed after it drops the
    # negative gradients first. One cheap node per ReLU, instead of a full backward hook (which
    # wraps the module's inputs and outputs in extra autograd nodes and costs ~40% of a backward).
    return _GuidedGradient.apply(output)


@contextlib.contextmanager
def guided_relus(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.ReLU`` of ``model`` that runs forward backpropagates guided
    (the guided node is attached to the graph at forward time)."""
    handles = [m.register_forward_hook(_guided_relu_output)
               for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Probe:
    """One forward pass of ``model`` on (images, tokens) with every analysis point recorded.

    ``probe[name]`` is the activation at point ``name`` (part of the autograd graph, so
    ``probe.grad(score, names)`` differentiates with respect to it). ``guided=True`` runs the
    forward and every backward through guided ReLUs.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                 guided: bool = False):
        self.model = model
        self.points = analysis_points(model)
        self.guided = guided
        self.activations: dict[str, torch.Tensor] = {}
        self._order: list[str] = []  # analysis points and ReLUs in the order the forward ran them
        self.images = images.detach().clone().requires_grad_(True)
        self.tokens = tokens
        handles = [point.register_forward_hook(self._recorder(name))
                   for name, point in self.points.items()]
        handles += [m.register_forward_hook(lambda *_: self._order.append("relu"))
                    for m in model.modules() if isinstance(m, nn.ReLU)]
        # Guided hooks must be in place during the forward: that is when autograd attaches
        # them to the graph; every backward through this probe is then guided.
        try:
            with torch.enable_grad(), (guided_relus(model) if guided else contextlib.nullcontext()):
                self.logits = model(self.images, tokens)
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, name: str):
        def record(module, inputs, output):
            self.activations[name] = output
            self._order.append(name)
        return record

    def relu_after(self, name: str) -> bool:
        """Whether any ReLU ran after point ``name`` (then guided backprop would also change the
        gradient *at* that point, and it cannot share a guided pass with plain gradients)."""
        if name not in self._order:
            raise KeyError(f"the model has no analysis point {name!r}")
        return "relu" in self._order[self._order.index(name) + 1:]

    def __contains__(self, name: str) -> bool:
        return name in self.activations

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.activations:
            raise KeyError(f"the model has no analysis point {name!r}; it has {sorted(self.activations)}")
        return self.activations[name]

    def grad(self, outputs: torch.Tensor, names: Sequence[str],
             grad_outputs: torch.Tensor | None = None, retain_graph: bool = True) -> list[torch.Tensor]:
        """d outputs / d point for each point name (guided through ReLUs when the probe is).
        A point that ``outputs`` does not depend on gets an exact zero gradient.
        ``retain_graph=False`` frees the graph's buffers: the last backward through this probe."""
        inputs = [self[n] for n in names]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs,
                                    retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
