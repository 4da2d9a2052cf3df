"""The synthetic VQA world: generated multi-object scenes in the real VQA v2 / COCO / VQA-HAT formats.

Each image shows 2..5 non-overlapping coloured shapes on a textured gray background. Questions
come from a few templates (existence, counting, attribute and relative-position questions) whose
answers depend on one or more specific objects, so a model has to look at the right object to
answer (beyond the answer priors). Because the world is generated, its ground truth is exact:

* which objects one must look at to answer a question (``object_indices``, and the pixels of
  those objects in the lossless instance maps),
* which question words matter (``word_indices``: the asked attribute and the words naming the
  object(s), positions in :func:`pipeline.data.vocab.tokenize`),
* same-answer question pairs about different objects of one image (``pairs``).

Human attention maps (VQA-HAT) are *simulated annotators*: blurred, jittered, noisy versions of a
question's ground-truth mask that sometimes miss an object or add a spurious blob.

Everything is deterministic from ``cfg.seed``: every image draws from its own
:class:`numpy.random.SeedSequence` keyed by (seed, split name, image index), so growing one split
never changes the scenes of another, and no file contains a timestamp (same seed, same bytes).

The package, one module per part: :mod:`.scenes` (objects, rendering, placement),
:mod:`.questions` (templates, answers, question selection, simulated human answers),
:mod:`.hat` (simulated VQA-HAT annotators), :mod:`.world` (generating and writing the world)
and :mod:`.ground_truth` (reading its ground truth back).
"""
from __future__ import annotations

# The public names of the modules, as importable from here as before the split; SIDES,
# NUM_HUMAN_ANSWERS, BACKGROUND_RANGE and the id strides stay outside __all__ (hence the noqa).
from pipeline.data.synthetic.ground_truth import load_ground_truth, load_instance_map, question_mask
from pipeline.data.synthetic.questions import (  # noqa: F401
    NUM_HUMAN_ANSWERS,
    SIDES,
    TEMPLATES,
    answer_question,
    question_text,
)
from pipeline.data.synthetic.scenes import (  # noqa: F401
    BACKGROUND_RANGE,
    COLORS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    instance_map,
    object_mask,
    render_scene,
)
from pipeline.data.synthetic.world import IMAGE_ID_STRIDE, QUESTION_ID_STRIDE, generate_world  # noqa: F401

__all__ = [
    "SHAPES",
    "SHAPE_PLURALS",
    "COLORS",
    "SIZES",
    "TEMPLATES",
    "SceneObject",
    "Scene",
    "object_mask",
    "render_scene",
    "instance_map",
    "question_text",
    "answer_question",
    "generate_world",
    "load_ground_truth",
    "load_instance_map",
    "question_mask",
]
