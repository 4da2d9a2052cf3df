"""CAM, class activation mapping (Zhou et al. 2016, "Learning deep features for discriminative
localization"): M_c(x, y) = sum_k w^c_k f_k(x, y), the backbone's global-average-pool classifier
weights of class c applied to the last conv feature maps f_k (the ``conv`` point).

CAM explains the *backbone's pretraining label*, not the VQA answer: it is defined only where the
backbone carries a GAP + linear classifier (``model.backbone.classifier``, an ``nn.Linear`` over the
channels of ``conv``), and the map does not depend on the question or on the explained answer.
The label is option ``cam.label`` (an int, or one int per image); by default each image's
highest-scoring pretraining label. ``extras["label"]`` holds the B explained label indices,
``extras["label_scores"]`` the B x L pretraining logits, ``extras["note"]`` says all this.

``image_map_raw`` is the B x h x w map on the conv grid, signed (no ReLU, as in Zhou et al.; the
classifier bias is left out as there); ``image_map`` is it upsampled to the input, still signed.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.attribution.base import Explanation, NotApplicable, register

NOTE = ("CAM explains the backbone's pretraining label (extras['label']) through its "
        "global-average-pool classifier, not the VQA answer; the map is signed (no ReLU)")


def _labels(option, scores: torch.Tensor) -> torch.Tensor:
    """The explained label per image: the ``cam.label`` option (int or B ints) or the argmax."""
    batch, num_labels = scores.shape
    if option is None:
        return scores.argmax(1)
    labels = torch.as_tensor(option, dtype=torch.long).flatten()
    if labels.numel() == 1:
        labels = labels.expand(batch)
    if labels.numel() != batch:
        raise ValueError(f"cam.label must be one int or one per image ({batch}), got {labels.numel()}")
    if ((labels < 0) | (labels >= num_labels)).any():
        raise ValueError(f"cam.label must lie in [0, {num_labels}) (the backbone's pretraining "
                         f"labels), got {labels.tolist()}")
    return labels.clone()


@register("cam")
def cam(ctx) -> Explanation:
    classifier = getattr(ctx.model.backbone, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise NotApplicable("CAM needs a global-average-pool classifier head; this backbone has none")
    probe = ctx.guided_probe()
    if "conv" not in probe:
        raise NotApplicable("CAM needs the model's 'conv' analysis point")
    activations = probe["conv"].detach()
    if activations.dim() != 4 or activations.shape[1] != classifier.in_features:
        raise NotApplicable(f"CAM needs the backbone classifier to read the channels of the 'conv' "
                            f"map; it reads {classifier.in_features} features, 'conv' is "
                            f"{tuple(activations.shape)}")
    with torch.no_grad():
        scores = classifier(activations.mean(dim=(2, 3)))  # the GAP head's pretraining logits
        labels = _labels(ctx.option("cam", "label", None), scores).to(activations.device)
        weights = classifier.weight[labels]  # B x K: w^c_k of each image's label
        raw = torch.einsum("bk,bkhw->bhw", weights, activations)
    return Explanation("cam", image_map=ctx.upsample(raw), image_map_raw=raw,
                       extras={"label": labels, "label_scores": scores, "note": NOTE})
