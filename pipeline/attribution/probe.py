"""The shared probe: every attribution method reaches a model only through it.

A :class:`Probe` runs the model once with hooks on its analysis points (docs/analysis_points.md),
keeps each point's activation so that gradients can be taken with respect to it, and can switch
the model's ReLUs to guided backpropagation. Methods ask for gradients of a score with respect
to named points; they never see the model class. Work that several methods share (one forward
and one backward for the gradient family) is computed once per probe and cached.

Methods that run passes of their own (occlusion, integrated gradients) read a point's output
with :func:`recording` and put their own tensor in its place with :func:`replacing`, so that they
too reach the model only through its analysis points.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
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
def _forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Each (module, hook) forward hook in place within the block, removed after it whatever
    happens (a hook left behind would change every later pass of the model)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def guided_relus(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.ReLU`` of ``model`` that runs forward backpropagates guided
    (the guided node is attached to the graph at forward time)."""
    with _forward_hooks((m, _guided_relu_output) for m in model.modules() if isinstance(m, nn.ReLU)):
        yield


@contextlib.contextmanager
def recording(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the dict it yields receives the output of each point of ``names`` the
    first time the point runs (a later pass does not overwrite it). A point the model lacks is
    simply absent from the dict, so a method can ask whether the model has it."""
    points = analysis_points(model)
    recorded: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        return lambda module, inputs, output: recorded.setdefault(name, output)

    with _forward_hooks((points[n], recorder(n)) for n in names if n in points):
        yield recorded


# Points that a module computes with a method of its own from the tokens alone (both heads:
# ``q = self.q(self.encode_question(tokens))``, docs/analysis_points.md). When such a point's
# output is replaced, the method is not run at all: the encoder is a sixth to a half of the head's
# time (measured on both heads), and occlusion runs the head once per occluded copy and question.
_COMPUTED_BY_METHOD = {"q": "encode_question"}


def _owner_method(model: nn.Module, point: nn.Module, method: str | None) -> nn.Module | None:
    """The module of ``model`` whose class defines ``method`` and that holds ``point``, if any."""
    if method is None:
        return None
    return next((m for m in model.modules() if callable(getattr(type(m), method, None))
                 and any(p is point for p in m.modules())), None)


@contextlib.contextmanager
def replacing(model: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """Within the block, analysis point ``name`` of ``model`` outputs ``value`` whatever it is
    given, and everything after the point computes from it (a 1-row ``value`` stands for every
    row of the batch: broadcast to the point's output). Gradients taken with respect to
    ``value`` are then gradients at the point: integrated gradients (Sundararajan et al. 2017,
    Eq. 1) differentiates the model at interpolated word embeddings this way; occlusion (Goyal
    et al. 2016, section 3.2) gives the head the original question feature ``q`` for each
    occluded image.

    When the module that holds point ``q`` computes it with ``encode_question(tokens)`` (both
    heads), that method is skipped for the block: its result would be thrown away. Points that
    only the encoder runs (``q_emb``) do not run then."""
    points = analysis_points(model)
    if name not in points:
        raise KeyError(f"the model has no analysis point {name!r}; it has {sorted(points)}")
    point = points[name]

    def fit(shape: torch.Size) -> torch.Tensor:
        if value.shape == shape:
            return value  # no broadcast node on the graph: gradients reach ``value`` unchanged
        try:
            return value.expand(shape)
        except RuntimeError as e:
            raise RuntimeError(f"analysis point {name!r} outputs {tuple(shape)}; the replacement "
                               f"{tuple(value.shape)} does not fit it") from e

    owner = _owner_method(model, point, _COMPUTED_BY_METHOD.get(name))
    if owner is None:
        with _forward_hooks([(point, lambda module, inputs, output: fit(output.shape))]):
            yield
        return
    method = _COMPUTED_BY_METHOD[name]
    # An instance attribute shadows the class's method for this block only; deleting it
    # restores the class's.
    setattr(owner, method, lambda tokens: fit(torch.Size((len(tokens), *value.shape[1:]))))
    try:
        yield
    finally:
        delattr(owner, method)


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
        hooks = [(point, self._recorder(name)) for name, point in self.points.items()]
        hooks += [(m, lambda *_: self._order.append("relu"))
                  for m in model.modules() if isinstance(m, nn.ReLU)]
        # Guided hooks must be in place during the forward: that is when autograd attaches
        # them to the graph; every backward through this probe is then guided.
        with _forward_hooks(hooks), torch.enable_grad(), \
                (guided_relus(model) if guided else contextlib.nullcontext()):
            self.logits = model(self.images, tokens)

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
