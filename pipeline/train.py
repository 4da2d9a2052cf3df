"""Stage ``train``: train a VQA model (``model=lstm_cnn`` or ``model=mlb``) on cached features.

    python -m pipeline.train model=mlb [trainer=gpu|ddp] [logger=csv] [model.optim.lr=...]
    python -m pipeline.train -m model=mlb,lstm_cnn seed=0,1,2 paths=sweep   # a sweep
    python -m pipeline.train model=mlb replicate=1   # training-seed replicate 1 (train.seed=1)

Writes
    ${paths.models_dir}/<model>/model.pt       the trained model, backbone included (``load_model``)
    ${paths.checkpoints_dir}/<model>/best.ckpt  Lightning checkpoint of the best epoch (val/acc)
    ${paths.metrics_dir}/train/<model>.json     official VQA accuracy on val (overall and per answer
                                                type) of the best epoch, epochs run, seconds.
Logs go to CSV and wandb (offline by default). An interrupted run resumes from
``${paths.checkpoints_dir}/<model>/last.ckpt``.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger

from pipeline.common.config import abspath, instantiate_trainer, stage_main
from pipeline.data import processed
from pipeline.data.datamodule import VQADataModule
from pipeline.common.files import write_json
from pipeline.models.backbones import build_backbone
from pipeline.models.checkpoint import model_metadata, save_model, trained_model_path, train_metrics_path
from pipeline.models.lightning import ANSWER_TYPE_KEYS, VQALightningModule
from pipeline.models.heads import head_feature_kind
from pipeline.models.vqa_model import VQAModel
from pipeline.common.seeding import seed_everything

log = logging.getLogger(__name__)


def checkpoint_dir(cfg: DictConfig) -> Path:
    return abspath(cfg.paths.checkpoints_dir) / str(cfg.model.name)


def _loggers(cfg: DictConfig, name: str) -> list:
    loggers = [CSVLogger(save_dir=abspath(cfg.paths.log_dir) / "csv", name=name)]
    if cfg.logger.wandb:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.logger.project, name=name, mode=cfg.logger.mode,
                                   save_dir=str(abspath(cfg.logger.dir)), job_type="train",
                                   config=OmegaConf.to_container(cfg, resolve=True)))
    return loggers


def _resumable(last: Path, hparams: dict) -> bool:
    """Whether ``last.ckpt`` comes from an interrupted run with the same settings."""
    if not last.is_file():
        return False
    saved = torch.load(last, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    same = {k: saved.get(k) for k in hparams} == hparams
    if not same:
        log.warning("%s was made with other settings; starting afresh", last)
    return same


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list | bool, root_dir: Path) -> pl.Trainer:
    """The configured Trainer (``trainer.lightning``) with what training adds: the model's
    epochs and gradient clipping, the deterministic kernels the run is seeded with (one setting,
    ``trainer.deterministic``), callbacks and loggers."""
    return instantiate_trainer(
        cfg.trainer, deterministic=bool(cfg.trainer.deterministic),
        max_epochs=int(cfg.model.optim.max_epochs), gradient_clip_val=cfg.model.optim.get("gradient_clip"),
        callbacks=callbacks, logger=loggers, default_root_dir=str(root_dir),
        enable_model_summary=False, num_sanity_val_steps=0)


def run(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    seed_everything(int(cfg.train.seed), deterministic=bool(cfg.trainer.deterministic))
    processed_dir = abspath(cfg.paths.processed_dir)
    question_vocab, answer_vocab = processed.load_vocabs(processed_dir)
    answer_vocab = answer_vocab.top(min(int(cfg.model.num_answers), len(answer_vocab)))
    backbone = build_backbone(cfg.backbone)
    question_mark = processed.question_mark(processed_dir)  # how prepare tokenised the questions
    metadata = model_metadata(cfg.model, cfg.backbone, backbone, question_vocab, answer_vocab,
                              int(cfg.data.max_question_length), str(cfg.data.name),
                              question_mark=question_mark)
    optim = OmegaConf.to_container(cfg.model.optim, resolve=True)

    val_records = processed.load_question_table(processed_dir, "val")
    feature_kind = head_feature_kind(str(cfg.model.name), metadata["model"]["arch"])
    module = VQALightningModule(metadata, optim, backbone.feature_channels(feature_kind),
                                val_answers=[r["answers"] for r in val_records],
                                val_answer_types=[r["answer_type"] for r in val_records])
    datamodule = VQADataModule(processed_dir, abspath(cfg.paths.features_dir), module.head.feature_kind,
                               answer_vocab, int(cfg.data.max_question_length), int(optim["batch_size"]),
                               int(cfg.trainer.num_workers), int(cfg.train.seed))

    ckpt_dir = checkpoint_dir(cfg)
    last = ckpt_dir / "last.ckpt"
    resume = bool(cfg.train.resume) and _resumable(last, dict(module.hparams))
    if not resume and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a fresh run must not pick up another run's "best"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/acc", mode="max",
                                 save_top_k=1, save_last=True, enable_version_counter=False)
    callbacks = [checkpoint, TQDMProgressBar(refresh_rate=10)]
    if optim.get("patience"):
        callbacks.append(EarlyStopping(monitor="val/acc", mode="max", patience=int(optim["patience"])))
    trainer = build_trainer(cfg, callbacks, _loggers(cfg, f"train_{cfg.model.name}"), ckpt_dir)
    if resume:
        log.info("resuming the interrupted run from %s", last)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None)

    best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else last
    best_state = torch.load(best_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best_state["state_dict"])
    results = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    metrics = {
        "model": str(cfg.model.name),
        "data": str(cfg.data.name),
        "val/acc": results["val/acc"],
        **{f"val/acc_{key}": results.get(f"val/acc_{key}") for key in ANSWER_TYPE_KEYS.values()},
        "val/loss": results["val/loss"],
        "best_epoch": int(best_state["epoch"]) + 1,
        "epochs": int(trainer.current_epoch),
        "seconds": round(time.perf_counter() - start, 1),
        "num_answers": len(answer_vocab),
        "train_questions": len(datamodule.datasets["train"]),
        "val_questions": len(datamodule.datasets["val"]),
    }
    if trainer.is_global_zero:
        model = VQAModel(backbone, module.head.cpu(), question_vocab, answer_vocab,
                         int(cfg.data.max_question_length), question_mark=question_mark)
        save_model(trained_model_path(cfg, str(cfg.model.name)), model, metadata)
        last.unlink(missing_ok=True)  # the run finished: nothing to resume
        write_json(train_metrics_path(cfg, str(cfg.model.name)), metrics)
        log.info("%s: val/acc %.4f (yes/no %s, number %s, other %s) in %.0f s", cfg.model.name,
                 metrics["val/acc"], metrics["val/acc_yes_no"], metrics["val/acc_number"],
                 metrics["val/acc_other"], metrics["seconds"])
    return metrics


main = stage_main(run)

if __name__ == "__main__":
    main()
