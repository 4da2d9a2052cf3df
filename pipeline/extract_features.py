"""Stage ``extract_features``: the frozen backbone over every image of every split, cached.

    python -m pipeline.extract_features [data=...] [backbone=scene_resnet|resnet152]
                                        [extract.device=cpu|cuda] [extract.batch_size=64]
                                        [extract.num_workers=0] [extract.chunk_rows=256]
                                        [extract.dtype=float16|float32]

Reads the processed image lists (``images_<split>.json`` from ``prepare``) and the images under
``data.root``; runs ``build_backbone(cfg.backbone)`` in eval mode without autograd; writes one
:mod:`feature store <pipeline.data.feature_store>` per split into ``${paths.features_dir}/`` and
``${paths.metrics_dir}/extract_features.json`` (counts, grid shape, what fc7 is, bytes on disk).
Each store holds the grid, its spatial mean and, when the backbone has fc6/fc7 layers (or, on
ResNet-152, their pool5 stand-in), the fc7 vector the LSTM-CNN reads.

Every stored value is finite: a batch whose features are inf or NaN, or beyond float16's range
(65504) when the store is float16, stops the stage with the image ids and the fix (the
backbone's weights, or ``extract.dtype=float32``), and no finished store appears
(:class:`~pipeline.data.feature_store.NonFiniteFeaturesError`, exit code 2).

A killed run resumes where it stopped: rows are checkpointed every ``extract.chunk_rows`` images,
and a rerun with the same images, backbone weights and prepared data continues from there.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.common.config import abspath, stage_main
from pipeline.data import processed
from pipeline.data.http_download import sha256_file
from pipeline.common.errors import MissingDataError
from pipeline.data.feature_store import (FC7_FILE, GRID_FILE, INDEX_FILE, POOLED_FILE,
                                         FeatureStoreWriter, store_dtype)
from pipeline.data.images import ImageFolderDataset, ImageTransform
from pipeline.common.files import write_json
from pipeline.models.backbones import Backbone, build_backbone

log = logging.getLogger(__name__)



def weights_sha256(backbone: Backbone) -> str:
    """Fingerprint of the backbone's parameters and buffers (BatchNorm statistics included):
    features from different weights must never end up in one store, even if the weights file
    kept its name."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def grid_shape_of(backbone: Backbone, device: torch.device) -> tuple[int, int, int]:
    """C x h x w of the backbone's grid at its input size (one forward pass of a blank image)."""
    with torch.inference_mode():
        blank = torch.zeros(1, 3, backbone.input_size, backbone.input_size, device=device)
        return tuple(backbone(blank).shape[1:])


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"extract.device={name} but torch sees no CUDA device; "
                           "use extract.device=cpu")
    return device


def extract_split(backbone: Backbone, dataset: ImageFolderDataset, writer: FeatureStoreWriter,
                  cfg_extract: DictConfig, device: torch.device, desc: str) -> Path:
    """Run the backbone over ``dataset`` (the images not yet in ``writer``), in order, and
    finish the store."""
    loader = DataLoader(dataset, batch_size=int(cfg_extract.batch_size), shuffle=False,
                        num_workers=int(cfg_extract.num_workers), pin_memory=device.type == "cuda")
    total = writer.rows_done + len(dataset)
    with tqdm(total=total, initial=writer.rows_done, desc=desc, unit="img") as progress, \
            torch.inference_mode():
        for _, images in loader:
            grid = backbone(images.to(device, non_blocking=True))
            writer.append(grid, backbone.fc7(grid) if writer.fc7_channels else None)
            progress.update(len(images))
    return writer.finish()


def run(cfg: DictConfig) -> dict:
    device = resolve_device(str(cfg.extract.device))
    backbone = build_backbone(cfg.backbone).to(device)
    if cfg.backbone.get("channels_last"):
        backbone.to(memory_format=torch.channels_last)
    grid_shape = grid_shape_of(backbone, device)
    processed_dir = abspath(cfg.paths.processed_dir)
    processed_config = processed_dir / processed.CONFIG
    if not processed_config.is_file():
        raise MissingDataError("processed data not found: run `python -m pipeline.prepare` with "
                               "the same data= and paths.root settings", processed_config)
    # What the features are a function of, besides the image list: a partial store made with
    # anything else is discarded instead of resumed.
    identity = {
        "backbone": backbone.name,
        "input_size": backbone.input_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "weights_sha256": weights_sha256(backbone),
        "processed_config_sha256": sha256_file(processed_config),
    }
    transform = ImageTransform(backbone.input_size, backbone.mean, backbone.std)
    data_root = abspath(cfg.data.root)
    features_dir = abspath(cfg.paths.features_dir)
    fc7_channels = backbone.fc7_channels if backbone.fc7_source else None
    dtype = store_dtype(cfg.extract.get("dtype"))
    log.info("%s on %s: grid %s per image, into %s", backbone.name, device, grid_shape, features_dir)
    log.info("fc7: %s", backbone.fc7_source or "none (this backbone has no fc6/fc7 layers)")

    # Metrics hold no wall-clock time (it is in the log): they must be identical run to run.
    metrics: dict = {"data": cfg.data.name, "backbone": backbone.name,
                     "input_size": backbone.input_size, "grid_shape": list(grid_shape),
                     "fc7_channels": fc7_channels, "fc7_source": backbone.fc7_source,
                     "dtype": dtype.name, "splits": {}}
    for key in cfg.data.splits:
        images = processed.load_images(processed_dir, key)
        writer = FeatureStoreWriter(features_dir, key, [im["image_id"] for im in images], grid_shape,
                                    identity, backbone.name, backbone.input_size,
                                    chunk_rows=int(cfg.extract.chunk_rows),
                                    fc7_channels=fc7_channels, fc7_source=backbone.fc7_source,
                                    dtype=dtype.name)
        remaining = ImageFolderDataset(data_root, images[writer.rows_done:], transform)
        start = time.perf_counter()
        directory = extract_split(backbone, remaining, writer, cfg.extract, device,
                                  desc=f"features {key}")
        seconds = time.perf_counter() - start
        log.info("%s: %d images (%d resumed from an interrupted run) in %.1f s, %.1f img/s",
                 key, len(images), len(images) - len(remaining), seconds,
                 len(remaining) / seconds if seconds > 0 else 0.0)
        metrics["splits"][key] = {
            "images": len(images),
            "bytes": sum((directory / name).stat().st_size
                         for name in (GRID_FILE, POOLED_FILE, FC7_FILE, INDEX_FILE)
                         if (directory / name).is_file()),
        }
    metrics["bytes_total"] = sum(split["bytes"] for split in metrics["splits"].values())
    write_json(abspath(cfg.paths.metrics_dir) / "extract_features.json", metrics)
    log.info("wrote %s", features_dir)
    return metrics


main = stage_main(run)

if __name__ == "__main__":
    main()
