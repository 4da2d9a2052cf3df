"""Stage ``attribute``: explain a trained model's answers on the validation questions with every
configured method.

    python -m pipeline.attribute model=mlb [attribution.methods=[gradcam,occlusion]]
                                 [attribution.limit=200] [trainer=ddp]

Runs as Lightning's ``trainer.predict``: each process explains its share of the images (all
questions of an image stay together, so occlusion computes an image's occluded copies once) and
writes one shard per batch keyed by question id; rank 0 merges them. The same command therefore
runs data-parallel over GPUs or nodes with ``trainer=ddp`` and gives the same arrays.

Writes ``${paths.attributions_dir}/<model>/`` (see :mod:`pipeline.attribution.store`) and
``${paths.metrics_dir}/attribute_<model>.json`` (counts, accuracy of the explained answers, skipped
methods with their reasons, questions with non-finite maps per method).
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.attribution import explain, explain_options
from pipeline.attribution.store import SHARDS, explanation_arrays, in_image_order, merge_shards, write_shard
from pipeline.common.config import abspath, instantiate_trainer, stage_main
from pipeline.data import processed
from pipeline.data.answers import vqa_accuracy
from pipeline.data.images import ImageTransform
from pipeline.data.vocab import pad_token_ids
from pipeline.data.vqa_format import load_image
from pipeline.common.files import write_json
from pipeline.models import load_trained_model
from pipeline.common.seeding import seed_everything

log = logging.getLogger(__name__)


class ImageGroupedQuestions(Dataset):
    """Item i = every question of the i-th image (so a batch never splits an image)."""

    def __init__(self, records: list[dict], data_root: Path, transform: ImageTransform, max_length: int):
        self.groups: list[list[dict]] = []
        for r in in_image_order(records):
            if self.groups and self.groups[-1][0]["image_id"] == r["image_id"]:
                self.groups[-1].append(r)
            else:
                self.groups.append([r])
        self.data_root, self.transform, self.max_length = data_root, transform, max_length

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[dict]:
        image = self.transform(load_image(self.data_root / self.groups[i][0]["image"]))
        return [{"record": r, "image": image} for r in self.groups[i]]


def collate_questions(groups: list[list[dict]], max_length: int) -> dict:
    items = [item for group in groups for item in group]
    tokens = pad_token_ids([item["record"]["token_ids"] for item in items], max_length)
    return {"images": torch.stack([item["image"] for item in items]), "tokens": tokens,
            "records": [item["record"] for item in items]}


class ExplainModule(pl.LightningModule):
    """predict_step = the model's answers plus ``explain`` with every configured method."""

    def __init__(self, model, methods: list[str], options: dict, pixel_channels: bool = False):
        super().__init__()
        self.pixel_channels = pixel_channels
        self.model = model.eval()
        self.methods = list(methods)
        self.options = options
        self.method_info: dict[str, dict] = {}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        images, tokens = batch["images"], batch["tokens"]
        with torch.no_grad():
            probabilities = torch.softmax(self.model(images, tokens), dim=1)
        confidence, predicted = probabilities.max(1)
        results = explain(self.model, images, tokens, methods=self.methods, target=predicted,
                          options=self.options)
        per_method = {}
        for name, explanation in results.items():
            arrays, info = explanation_arrays(explanation, len(images), self.pixel_channels)
            per_method[name] = arrays
            known = self.method_info.setdefault(name, {"nonfinite_questions": 0, "seconds": 0.0})
            known["nonfinite_questions"] += info.pop("nonfinite_questions", 0)
            known["seconds"] += explanation.seconds
            known.update(info)
        rows = []
        for record, answer_id, p in zip(batch["records"], predicted.tolist(), confidence.tolist()):
            answer = self.model.answer_vocab.answers[answer_id]
            accuracy = vqa_accuracy(answer, record["answers"]) if record["answers"] else None
            rows.append({"question_id": record["question_id"], "image_id": record["image_id"],
                         "question": record["question"], "tokens": record["tokens"],
                         "answer_type": record["answer_type"], "predicted": answer,
                         "probability": p, "accuracy": accuracy,
                         "correct": None if accuracy is None else accuracy > 0})
        return {"question_ids": np.array([r["question_id"] for r in rows]), "rows": rows,
                "per_method": per_method}


class ShardWriter(BasePredictionWriter):
    """Writes every predicted batch to ``<out>/.shards/rank<r>_batch<b>.npz`` right away, so
    memory stays at one batch and a multi-process run needs no gathering of tensors."""

    def __init__(self, out_dir: Path, total_questions: int):
        super().__init__(write_interval="batch")
        self.shard_dir = out_dir / SHARDS
        self.total = total_questions
        self.bar = None
        self.start = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.bar = tqdm(total=self.total, desc=f"explaining (rank {trainer.global_rank})", unit="q")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        write_shard(self.shard_dir, f"rank{trainer.global_rank}_batch{batch_idx:06d}",
                    prediction["question_ids"], prediction["rows"], prediction["per_method"])
        self.bar.update(len(prediction["rows"]))
        self.bar.set_postfix(q_per_s=f"{self.bar.n / (time.perf_counter() - self.start):.2f}", refresh=False)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.bar.close()


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The configured Trainer (``trainer.lightning``: devices, strategy) set up for explaining.
    Full precision whatever the config says, and no deterministic setting: the stage is seeded
    (deterministic kernels, warnings only) by ``seed_everything``, which a Trainer flag would
    override."""
    return instantiate_trainer(
        cfg.trainer, precision="32-true", deterministic=None, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        inference_mode=False,  # the methods need gradients
        use_distributed_sampler=False,  # images are split by rank in run()
        callbacks=[])


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    seed_everything(int(cfg.seed))
    settings = cfg.attribution
    processed_dir = abspath(cfg.paths.processed_dir)
    model = load_trained_model(cfg, str(cfg.model.name))
    records = in_image_order(processed.load_question_table(processed_dir, str(settings.split)))
    if settings.limit:
        records = records[:int(settings.limit)]
    options = explain_options(settings)

    out_dir = abspath(cfg.paths.attributions_dir) / str(cfg.model.name)
    trainer = build_trainer(cfg)
    rank, world = trainer.global_rank, trainer.world_size
    if rank == 0 and out_dir.exists():
        shutil.rmtree(out_dir)  # a half-written store from a killed run must not survive
    trainer.strategy.barrier()
    dataset = ImageGroupedQuestions(records, abspath(cfg.data.root),
                                    ImageTransform(model.backbone.input_size, model.backbone.mean,
                                                   model.backbone.std),
                                    int(cfg.data.max_question_length))
    dataset.groups = dataset.groups[rank::world]  # this process's images
    images_per_batch = max(1, int(settings.batch_size) // max(1, max(len(g) for g in dataset.groups)))
    loader = DataLoader(dataset, batch_size=images_per_batch, shuffle=False,
                        num_workers=int(cfg.trainer.num_workers),
                        collate_fn=functools.partial(collate_questions,
                                                     max_length=int(cfg.data.max_question_length)))
    writer = ShardWriter(out_dir, sum(len(g) for g in dataset.groups))
    trainer.callbacks.append(writer)
    module = ExplainModule(model, list(settings.methods), options, bool(settings.get("store_pixel_channels", False)))
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return {}
    # Times go to the metrics and the log, not into the store: the store must be identical run
    # to run.
    method_seconds = {m: info.pop("seconds", 0.0) for m, info in module.method_info.items()}
    index = merge_shards(out_dir, list(settings.methods), module.method_info,
                         {"model": str(cfg.model.name), "data": str(cfg.data.name),
                          "split": str(settings.split), "options": options})
    (out_dir / SHARDS).rmdir()
    questions = index["questions"]
    scored = [q["accuracy"] for q in questions if q["accuracy"] is not None]
    metrics = {
        "model": str(cfg.model.name),
        "questions": len(questions),
        "vqa_accuracy": float(np.mean(scored)) if scored else None,
        "methods": {m: {k: v for k, v in info.items() if k in ("skipped", "nonfinite_questions")}
                    for m, info in index["methods"].items()},
    }
    explained_here = max(1, sum(len(g) for g in dataset.groups))  # rank 0's share of the questions
    for m, info in metrics["methods"].items():
        info["ms_per_question"] = round(1000 * method_seconds.get(m, 0.0) / explained_here, 2)
        log.info("%s: %.1f ms per question", m, info["ms_per_question"])
        if info.get("skipped"):
            log.info("%s skipped: %s", m, info["skipped"])
        if info.get("nonfinite_questions"):
            log.warning("%s: %d question(s) with non-finite maps (marked invalid in the store)",
                        m, info["nonfinite_questions"])
    write_json(abspath(cfg.paths.metrics_dir) / f"attribute_{cfg.model.name}.json", metrics)
    seconds = time.perf_counter() - start
    metrics["seconds"] = round(seconds, 1)
    log.info("explained %d questions with %d methods in %.0f s (%.2f questions/s)", len(questions),
             len(settings.methods), seconds, len(questions) / seconds)
    return metrics


main = stage_main(run)

if __name__ == "__main__":
    main()
