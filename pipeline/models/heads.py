"""The VQA heads by name: each head class registers itself with ``@register_head("name")``, and
the model config's ``name`` builds it. Importing ``pipeline.models`` imports (and so registers)
the built-in heads."""
from __future__ import annotations

from typing import Callable

from torch import nn

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register the decorated head class as model ``name``, which becomes its ``name``
    attribute (what ``VQAModel.name`` reports)."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in HEADS:
            raise ValueError(f"model {name!r} registered twice")
        cls.name = name
        HEADS[name] = cls
        return cls
    return add


def head_class(name: str) -> type[nn.Module]:
    if name not in HEADS:
        raise ValueError(f"unknown model {name!r}; registered heads: {sorted(HEADS)}")
    return HEADS[name]


def build_head(name: str, arch: dict, vocab_size: int, num_answers: int, image_channels: int) -> nn.Module:
    """The head of model ``name`` with the architecture sizes of ``arch`` (model.arch config);
    ``image_channels`` is the width of what it reads (:func:`head_feature_kind`)."""
    return head_class(name)(vocab_size, num_answers, image_channels, **dict(arch))


def head_feature_kind(name: str, arch: dict) -> str:
    """What model ``name`` with ``arch`` reads from the feature store: ``grid``, ``pooled`` or
    ``fc7`` (``backbone.feature_channels(kind)`` is its width)."""
    head = head_class(name)
    # A head whose input depends on its settings says so with feature_kind_of(arch); any other
    # declares the class attribute feature_kind.
    return head.feature_kind_of(arch) if hasattr(head, "feature_kind_of") else head.feature_kind
