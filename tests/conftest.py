"""Shared fixtures: small folders in the real VQA / COCO / VQA-HAT layouts, made by the tests."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests never reach the network and never upload: wandb stays offline.
os.environ.setdefault("WANDB_MODE", "offline")
# The suite runs in parallel (pytest -n 2 on 2 cores): one torch thread per worker, or the
# workers' thread pools fight over the cores and tiny models run many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

QUESTIONS = [
    # (question_id, image_id, question, answers, answer_type, question_type)
    (420, 42, "What color is the dog?", ["brown"] * 8 + ["tan", "Brown"], "other", "what color is the"),
    (421, 42, "Is there a dog?", ["yes"] * 10, "yes/no", "is there a"),
    (70, 7, "How many people are there?", ["2"] * 6 + ["two", "3", "2", "2"], "number", "how many"),
    (71, 7, "Is it raining?", ["no"] * 9 + ["yes"], "yes/no", "is it"),
]


def write_vqa_split(root: Path, version: str, split: str, questions=QUESTIONS, image_size=(40, 30)):
    """Write question/annotation JSON, COCO-named JPEGs for ``questions`` into ``root``."""
    prefix = "v2_" if version == "v2" else ""
    qfile = root / f"{prefix}OpenEnded_mscoco_{split}_questions.json"
    afile = root / f"{prefix}mscoco_{split}_annotations.json"
    root.mkdir(parents=True, exist_ok=True)
    qfile.write_text(json.dumps({
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split,
        "license": {},
        "questions": [{"image_id": i, "question": q, "question_id": qid}
                      for qid, i, q, *_ in questions],
    }))
    afile.write_text(json.dumps({
        "info": {}, "license": {}, "data_subtype": split,
        "annotations": [{
            "question_id": qid, "image_id": i, "question_type": qt, "answer_type": at,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, a in enumerate(answers)],
            "multiple_choice_answer": max(set(answers), key=answers.count),
        } for qid, i, _, answers, at, qt in questions],
    }))
    (root / split).mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id in sorted({q[1] for q in questions}):
        pixels = rng.integers(0, 255, (image_size[1], image_size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / f"COCO_{split}_{image_id:012d}.jpg")
    return qfile, afile


def write_hat_maps(root: Path, hat_dir: str, question_ids, annotators: int, size=(20, 16)):
    d = root / hat_dir
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for qid in question_ids:
        for k in range(1, annotators + 1):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(
                d / f"{qid}_{k}.png")


@pytest.fixture
def vqa_root(tmp_path) -> Path:
    """A tiny VQA v2 release: train2014 and val2014 with the same four questions, HAT maps."""
    root = tmp_path / "vqa"
    write_vqa_split(root, "v2", "train2014")
    val = [(q[0] + 1_000_000, q[1] + 1000, *q[2:]) for q in QUESTIONS]
    write_vqa_split(root, "v2", "val2014", val)
    write_hat_maps(root, "vqahat_train", [QUESTIONS[0][0]], 1)
    write_hat_maps(root, "vqahat_val", [q[0] for q in val[:3]], 3)
    return root


TINY_PIPELINE = ["data=synthetic_tiny", "backbone.channels=[8,8,16,16]", "backbone.pretrain.epochs=1",
                 "backbone.fc=[32,32]", "backbone.pretrain.fc_epochs=2",
                 "logger=csv", "model.optim.max_epochs=2", "model.optim.batch_size=32",
                 # No training-seed replicates: tests/test_replicates.py makes its own.
                 "replicates.seeds=[]"]


@pytest.fixture(scope="session")
def trained_world(tmp_path_factory):
    """A tiny world carried through prepare, pretrain_backbone, extract_features and training of
    both models (a couple of epochs: enough for non-trivial maps, not for accuracy)."""
    from pipeline import extract_features, pretrain_backbone, prepare, train
    from pipeline.common.config import compose

    root = tmp_path_factory.mktemp("trained")
    cfg = compose([*TINY_PIPELINE, f"paths.root={root}"])
    prepare.run(cfg)
    pretrain_backbone.run(cfg)
    extract_features.run(cfg)
    for name in ("lstm_cnn", "mlb"):
        train.run(compose([*TINY_PIPELINE, f"paths.root={root}", f"model={name}"]))
    return root


@pytest.fixture(scope="session")
def explained_world(trained_world):
    """``trained_world`` plus the attribute stage of both models on every validation question
    with every configured method (the default store layout under
    ``<root>/attributions/synthetic_tiny/<model>``). Evaluation stages read it; tests that need
    to change it must copy it first."""
    from pipeline import attribute
    from pipeline.common.config import compose

    for name in ("lstm_cnn", "mlb"):
        attribute.run(compose([*TINY_PIPELINE, f"paths.root={trained_world}", f"model={name}"]))
    return trained_world


def evaluation_config(root, *overrides):
    """The evaluation stages' config on a world made by the fixtures above."""
    from pipeline.common.config import compose

    return compose([*TINY_PIPELINE, f"paths.root={root}", *overrides])


# res5c of the calibrated random ResNet-152 stays in the units; this is "well below" float16's
# largest value (65504) with a margin of three orders of magnitude.
RES5C_LIMIT = 100.0


@pytest.fixture(scope="session")
def random_init_resnet152_weights(tmp_path_factory):
    """A file holding a *randomly initialised* torchvision ``resnet152(weights=None)`` state dict
    (ImageNet weights cannot be downloaded here), with every BatchNorm's running statistics set
    to those of its input over a few random images (one training-mode forward with cumulative
    averaging: ``pipeline.models.random_init.random_init_resnet152_state_dict``), so that every
    block's output is normalised and res5c stays in range. The raw initialisation (BatchNorm at
    identity) overflows float16 (res5c ~1e8). Checked here on other random images: res5c's max
    and std at 224 px (tests/test_resnet152.py checks 448 px). The pipeline never uses random
    weights by itself: tests pass this file as ``backbone.weights=<file>``."""
    from pipeline.models.backbones import ResNet152
    from pipeline.models.random_init import random_init_resnet152_state_dict

    state = random_init_resnet152_state_dict(seed=0, images=4, size=224)
    path = tmp_path_factory.mktemp("resnet152") / "resnet152_random_init.pth"
    torch.save(state, path)
    backbone = ResNet152(224, state).freeze()
    with torch.inference_mode():
        res5c = backbone(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    assert res5c.shape[1:] == (2048, 7, 7) and torch.isfinite(res5c).all()
    largest, std = res5c.abs().max().item(), res5c.std().item()
    assert largest < RES5C_LIMIT and 0.1 < std < 10, (largest, std)
    return path
