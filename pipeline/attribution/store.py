"""The attribution store that the ``attribute`` stage writes and the evaluation stages read.

    <attributions_dir>/<model>/index.json     model, data, methods (skip reasons, array names,
                                              non-finite counts) and one row per question:
                                              ids, question, answer type, predicted answer,
                                              its probability, VQA accuracy, correct or not
    <attributions_dir>/<model>/<method>.npz   arrays in index order (compressed): image_map
                                              (N x H x W, float16), image_map_raw (the native
                                              map; per-channel pixel maps only on request), question_map
                                              (N x T), the method's per-question extras
                                              (``extra/<name>``) and ``valid`` (N: all finite)

The stage computes in :func:`in_image_order` (image id, then question id: an image's questions
stay together, so a batch decodes and occludes each image once). While it runs, each rank writes
one shard per batch into ``.shards/`` keyed by question id; :func:`merge_shards` sorts them by
question id alone into the files above. The store's order is deliberately not the computing
order: ranks interleave images, and sorting by the one key every row has makes the files the same
however many processes computed them (readers look questions up by id, never by position).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.attribution.base import Explanation
from pipeline.common.errors import DataError
from pipeline.common.files import atomic_path, read_json, write_json

INDEX = "index.json"
SHARDS = ".shards"
MAP_KEYS = ("image_map", "image_map_raw", "question_map")


def flatten_extras(extras: dict, batch: int, prefix: str = "extra/") -> tuple[dict, dict]:
    """Split a method's extras into per-question arrays (tensors whose first dim is the batch)
    and everything else (kept as JSON: notes, labels)."""
    arrays, other = {}, {}
    for key, value in extras.items():
        if isinstance(value, dict):
            a, o = flatten_extras(value, batch, f"{prefix}{key}/")
            arrays.update(a)
            other.update(o)
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            arrays[f"{prefix}{key}"] = value.detach().cpu().numpy()
        elif isinstance(value, (str, int, float, bool)) or value is None:
            other[f"{prefix}{key}"] = value
    return arrays, other


def explanation_arrays(explanation: Explanation, batch: int,
                       pixel_channels: bool = False) -> tuple[dict, dict]:
    """Per-question numpy arrays of one explanation (maps, extras, ``valid``) and its JSON
    side information (skip reason, non-array extras, non-finite count).

    Pixel-resolution maps are stored in half precision relative to their own largest |value|
    (``image_map`` / ``image_map_scale``, 3 significant digits of the largest value: evaluation
    ranks them), so that small gradients do not underflow float16 into ties; :func:`load_method`
    multiplies the scale back. A raw map with one value per pixel *and channel* (guided backprop,
    integrated gradients: B x 3 x H x W) only with ``pixel_channels``: it would triple the
    store, and ``image_map`` already holds its per-pixel summary."""
    if explanation.skipped:
        return {}, {"skipped": explanation.skipped}
    arrays = {}
    for key in MAP_KEYS:
        value = getattr(explanation, key)
        if value is not None:
            arrays[key] = value.detach().cpu().float().numpy()
    extras, other = flatten_extras(explanation.extras, batch)
    finite = np.ones(batch, bool)
    for a in arrays.values():
        finite &= np.isfinite(a.reshape(batch, -1)).all(1)
    image_map = arrays.get("image_map")
    raw = arrays.get("image_map_raw")
    if raw is not None and image_map is not None and raw.ndim == 4 and raw.shape[-2:] == image_map.shape[-2:]:
        if pixel_channels:
            arrays["image_map_raw"] = raw.astype(np.float16)
        else:
            del arrays["image_map_raw"]
    if image_map is not None:
        scale = np.abs(image_map.reshape(batch, -1)).max(1).astype(np.float32)
        safe = np.where((scale > 0) & np.isfinite(scale), scale, 1).astype(np.float32)
        arrays["image_map"] = (image_map / safe[:, None, None]).astype(np.float16)
        arrays["image_map_scale"] = safe
    arrays.update(extras)
    arrays["valid"] = finite
    other["nonfinite_questions"] = int((~finite).sum())
    return arrays, other


def write_shard(shard_dir: Path, name: str, question_ids: np.ndarray, rows: list[dict],
                per_method: dict[str, dict]) -> Path:
    """One batch of one rank: arrays of every method, keyed ``<method>/<array>``."""
    # The per-question rows travel as JSON strings: npz holds only arrays, and no pickles.
    payload = {"question_ids": question_ids, "rows": np.array([json.dumps(r) for r in rows])}
    for method, arrays in per_method.items():
        for key, value in arrays.items():
            payload[f"{method}/{key}"] = value
    with atomic_path(Path(shard_dir) / f"{name}.npz") as tmp:
        np.savez(tmp, **payload)
    return Path(shard_dir) / f"{name}.npz"


def in_image_order(records: list[dict]) -> list[dict]:
    """Question records sorted by image id, then question id: the order in which the attribute
    stage explains questions (and :func:`pipeline.evaluation.inputs.question_batch` feeds them),
    so that an image's questions are neighbours. A new list; ``records`` is left as it is."""
    return sorted(records, key=lambda r: (r["image_id"], r["question_id"]))


def merge_shards(out_dir: Path, methods: list[str], method_info: dict, meta: dict) -> dict:
    """Merge every shard in ``out_dir/.shards`` into the store files, sorted by question id, not
    by :func:`in_image_order` (see the module docstring; duplicates, which padding may produce,
    are dropped)."""
    shard_files = sorted((out_dir / SHARDS).glob("*.npz"))
    if not shard_files:
        raise DataError("no attribution shards to merge", out_dir / SHARDS)
    shards = [np.load(f, allow_pickle=False) for f in shard_files]
    qids = np.concatenate([s["question_ids"] for s in shards])
    rows = [json.loads(str(r)) for s in shards for r in s["rows"]]
    _, order = np.unique(qids, return_index=True)  # first row of each id, by ascending id
    index = {**meta, "methods": {}, "questions": [rows[i] for i in order]}
    for method in methods:
        info = dict(method_info.get(method, {}))
        keys = sorted({k.split("/", 1)[1] for s in shards for k in s.files if k.startswith(f"{method}/")})
        if not keys:
            index["methods"][method] = {**info, "arrays": []}
            continue
        arrays = {k: np.concatenate([s[f"{method}/{k}"] for s in shards])[order] for k in keys}
        with atomic_path(out_dir / f"{method}.npz") as tmp:
            np.savez_compressed(tmp, question_ids=qids[order], **arrays)
        info["nonfinite_questions"] = int((~arrays["valid"]).sum()) if "valid" in arrays else 0
        index["methods"][method] = {**info, "arrays": keys}
    write_json(out_dir / INDEX, index)
    for f in shard_files:
        f.unlink()
    return index


def read_arrays(path: Path, keys=None) -> dict[str, np.ndarray]:
    """Arrays of one method file (only ``keys`` when given: the others are not decompressed),
    ``image_map`` back at its stored scale as float32."""
    with np.load(path) as data:
        wanted = [k for k in (data.files if keys is None else keys)
                  if k in data.files and k != "image_map_scale"]
        arrays = {k: data[k] for k in wanted}
        if "image_map" in arrays and "image_map_scale" in data.files:
            arrays["image_map"] = (arrays["image_map"].astype(np.float32)
                                   * data["image_map_scale"][:, None, None])
    return arrays


def load_index(attribution_dir: Path) -> dict:
    path = Path(attribution_dir) / INDEX
    if not path.is_file():
        raise DataError("no attributions here: run `python -m pipeline.attribute model=<model>` "
                        "(or `dvc repro attribute`) first", path)
    return read_json(path)


def load_method(attribution_dir: Path, method: str) -> dict[str, np.ndarray]:
    """Arrays of one method (``question_ids``, ``image_map``...), in index order."""
    index = load_index(attribution_dir)
    info = index["methods"].get(method)
    if info is None:
        raise DataError(f"method {method!r} was not run; the store has {sorted(index['methods'])}",
                        attribution_dir)
    if info.get("skipped"):
        raise DataError(f"method {method!r} was skipped for this model: {info['skipped']}",
                        attribution_dir)
    path = Path(attribution_dir) / f"{method}.npz"
    arrays = read_arrays(path)
    if len(arrays["question_ids"]) == 0:
        raise DataError(f"the attribution store of {method!r} is empty: rerun `python -m "
                        "pipeline.attribute`", path)
    return arrays
