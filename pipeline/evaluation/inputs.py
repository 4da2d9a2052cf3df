"""What the evaluation stages read: the attribution store of each model, human attention maps
(VQA-HAT layout) and, on synthetic data, the exact ground-truth masks, all brought to one
resolution (``evaluation.resolution``, 16 x 16 as Goyal et al.; 14 x 14 as in VQA-HAT).

Maps of any size are resized by area averaging (``adaptive_avg_pool2d``: each cell is the mean
of the pixels it covers), so a human map of another size is resized, never rejected.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image

from pipeline.attribution import store
from pipeline.common.config import abspath
from pipeline.data import processed
from pipeline.common.errors import DataError
from pipeline.data.vocab import pad_token_ids


def to_resolution(maps: np.ndarray, resolution: int) -> np.ndarray:
    """N x H x W (or H x W) maps -> N x r x r (or r x r) by area averaging, float64."""
    x = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    single = x.dim() == 2
    if single:
        x = x[None]
    out = nnf.adaptive_avg_pool2d(x[:, None], resolution)[:, 0].double().numpy()
    return out[0] if single else out


def attribution_dir(cfg, model: str) -> Path:
    return abspath(cfg.paths.attributions_dir) / model


def rerun_attribute(cfg, model: str) -> str:
    """How to write ``model``'s attribution store again: the command and the DVC stage (the
    replicate's when ``cfg`` is a training-seed replicate's, pipeline.common.config.replicate_config)."""
    replicate = cfg.get("replicate")
    if replicate is None:
        return f"rerun `python -m pipeline.attribute model={model}` (stage attribute@{model})"
    return (f"rerun `python -m pipeline.attribute model={model} replicate={replicate}` "
            f"(stage attribute_replicate@{model}-{replicate})")


def load_store(cfg, model: str) -> dict:
    """The index of ``model``'s attribution store; a missing or empty store is an error that
    names the stage which should have written it."""
    directory = attribution_dir(cfg, model)
    if not (directory / store.INDEX).is_file():
        raise DataError(f"no attribution store of {model}: {rerun_attribute(cfg, model)}", directory)
    index = store.load_index(directory)
    if not index.get("questions"):
        raise DataError(f"the attribution store of {model} is empty: {rerun_attribute(cfg, model)}",
                        directory)
    return index


def methods_that_ran(index: dict) -> list[str]:
    """Methods that ran on this model (not skipped), in the order the stage ran them (not
    :func:`pipeline.attribution.available_methods`, the methods that are registered)."""
    return [m for m, info in index["methods"].items() if not info.get("skipped")]


def read_method(cfg, model: str, method: str, keys: Iterable[str] | None = None, *,
                optional: Iterable[str] = (), index: dict | None = None,
                needs: str = "") -> dict[str, np.ndarray]:
    """The arrays ``keys`` (every array with None) and, where the method has them, ``optional``
    of one method of ``model``'s attribution store, with ``question_ids``, in index order; only
    those arrays are decompressed (:func:`pipeline.attribution.store.read_arrays`).

    Checked: the method ran and was not skipped, its file is there with every one of ``keys``,
    and its question ids are the index's (``index``: the store's, loaded when not given). Any
    failure is a :class:`DataError` naming the command and stage that write the store again
    (:func:`rerun_attribute`), after ``needs`` (why the caller needs this method) when given."""
    index = load_store(cfg, model) if index is None else index
    path = attribution_dir(cfg, model) / f"{method}.npz"
    info = index["methods"].get(method)
    keys = None if keys is None else list(keys)
    if info is None:
        problem = f"has no {method} (not run: add it to attribution.methods)"
    elif info.get("skipped"):
        problem = f"has no {method} (skipped: {info['skipped']})"
    elif not path.is_file():
        problem = f"lists {method} but has no arrays for it"
    else:
        arrays = store.read_arrays(path, None if keys is None else ["question_ids", *keys, *optional])
        missing = sorted({"question_ids", *(keys or ())} - set(arrays))
        if missing:
            problem = f"has no {missing} for {method}"
        elif arrays["question_ids"].tolist() != [int(q["question_id"]) for q in index["questions"]]:
            problem = f"lists other questions for {method} than its index (a half-written store?)"
        else:
            return arrays
    raise DataError(f"the attribution store of {model} {problem}{'; ' + needs if needs else ''}: "
                    f"{rerun_attribute(cfg, model)}", path)


def question_batch(cfg, model, split_key: str, count: int | None = None,
                   token_width: int | None = None) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """The first ``count`` questions of a split (all with None; by image id, then question id)
    as the attribute stage feeds them to ``model``: (records, images N x 3 x S x S normalised
    for the model's backbone, tokens N x T). T is ``token_width``, or by default the longest
    question's length capped at ``data.max_question_length``. Each image is decoded once."""
    from pipeline.data.images import ImageTransform
    from pipeline.data.vqa_format import load_image

    processed_dir = abspath(cfg.paths.processed_dir)
    records = processed.load_question_table(processed_dir, split_key)
    records = store.in_image_order(records)
    records = records if count is None else records[:int(count)]
    if not records:
        raise DataError(f"no {split_key} questions: run `python -m pipeline.prepare` (stage prepare)",
                        processed.questions_file(processed_dir, split_key))
    transform = ImageTransform(model.backbone.input_size, model.backbone.mean, model.backbone.std)
    root = abspath(cfg.data.root)
    decoded = {}
    for r in records:
        if r["image"] not in decoded:
            decoded[r["image"]] = transform(load_image(root / r["image"]))
    images = torch.stack([decoded[r["image"]] for r in records])
    width = int(token_width) if token_width is not None else min(
        int(cfg.data.max_question_length), max(1, max(len(r["token_ids"]) for r in records)))
    return records, images, pad_token_ids([r["token_ids"] for r in records], width)


def split_name(cfg, split_key: str) -> str:
    """The file-level split name (``val2014``) of a split key (``val``)."""
    return str(cfg.data.splits[split_key])


def human_maps(cfg, split_key: str, question_ids, resolution: int) -> dict[int, np.ndarray]:
    """question id -> A x r x r human attention maps (one per annotator, values in [0, 1]) for
    the questions that have any; questions without a map are simply absent (callers count them)."""
    index = processed.load_hat_index(abspath(cfg.paths.processed_dir), split_key)
    root = abspath(cfg.data.root)
    out = {}
    for qid in question_ids:
        files = index.get(int(qid))
        if not files:
            continue
        maps = []
        for f in files:
            with Image.open(root / f) as im:
                maps.append(to_resolution(np.asarray(im.convert("L"), dtype=np.float32) / 255.0, resolution))
        out[int(qid)] = np.stack(maps)
    return out


def ground_truth_maps(cfg, split_key: str, question_ids, resolution: int) -> dict[int, np.ndarray]:
    """question id -> r x r share of each cell covered by the objects one must look at (exact,
    from the synthetic world's instance maps). Empty for real data, which has no such truth."""
    if cfg.data.source != "synthetic":
        return {}
    from pipeline.data.synthetic import question_mask

    root, split = abspath(cfg.data.root), split_name(cfg, split_key)
    return {int(q): to_resolution(question_mask(root, split, int(q)).astype(np.float32), resolution)
            for q in question_ids}


def ground_truth_questions(cfg, split_key: str) -> dict:
    """The synthetic world's ground truth of a split (``questions``: word indices, objects;
    ``pairs``: same-answer question pairs); empty for real data."""
    if cfg.data.source != "synthetic":
        return {"images": {}, "questions": {}, "pairs": []}
    from pipeline.data.synthetic import load_ground_truth

    return load_ground_truth(abspath(cfg.data.root), split_name(cfg, split_key))


def as_bool(value) -> bool | None:
    """A CSV cell of a boolean column (True/False, "True"/"False", empty) as bool or None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None
