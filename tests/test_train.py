"""Training end to end on the tiny world: prepare -> pretrain_backbone -> extract_features ->
train, then the model file, resuming, NaN handling, loggers."""
import json
import logging

import pytest
import torch

from pipeline import extract_features, pretrain_backbone, prepare, train
from pipeline.config import compose
from pipeline.data import processed
from pipeline.data.feature_store import FeatureStore
from pipeline.data.images import ImageTransform
from pipeline.data.vqa_format import load_image
from pipeline.models import lightning as lightning_module
from pipeline.models import load_model

TINY = ["data=synthetic_tiny", "backbone.channels=[8,8,16,16]", "backbone.pretrain.epochs=1",
        "logger=csv", "model.optim.max_epochs=2", "model.optim.batch_size=32"]


def tiny_cfg(root, *overrides):
    return compose([*TINY, f"paths.root={root}", *overrides])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared tiny world with a pretrained backbone and extracted features."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(root)
    prepare.run(cfg)
    pretrain_backbone.run(cfg)
    extract_features.run(cfg)
    return root


@pytest.mark.parametrize("name", ["lstm_cnn", "mlb"])
def test_train_writes_model_metrics_and_checkpoint(world, name):
    cfg = tiny_cfg(world, f"model={name}")
    metrics = train.run(cfg)
    saved = json.loads((world / f"reports/metrics/train/{name}.json").read_text())
    assert saved["model"] == name and 0.0 <= saved["val/acc"] <= 1.0
    assert saved["val/acc"] == pytest.approx(metrics["val/acc"])
    assert {"val/acc_yes_no", "val/acc_number", "val/acc_other", "epochs", "seconds"} <= set(saved)
    out = world / "models" / name
    checkpoints = world / "checkpoints" / name
    assert (checkpoints / "best.ckpt").is_file()
    assert not (checkpoints / "last.ckpt").exists()  # finished: nothing to resume
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]  # what the evaluation depends on

    # the exported model, end to end from pixels, answers as the head did on cached features
    question_vocab, answer_vocab = processed.load_vocabs(world / "data/processed/synthetic_tiny")
    model = load_model(out / "model.pt", question_vocab=question_vocab, answer_vocab=answer_vocab)
    records = processed.load_question_table(world / "data/processed/synthetic_tiny", "val")[:4]
    transform = ImageTransform(model.backbone.input_size, model.backbone.mean, model.backbone.std)
    images = torch.stack([transform(load_image(world / "data/raw/synthetic_tiny" / r["image"]))
                          for r in records])
    tokens = model.encode_questions([r["question"] for r in records])
    with torch.no_grad():
        end_to_end = model(images, tokens)
        store = FeatureStore.open(world / "data/features/synthetic_tiny/scene_resnet", "val")
        rows = [store.row_of(r["image_id"]) for r in records]
        cached = store.grid(rows) if model.head.feature_kind == "grid" else store.pooled(rows)
        from_cache = model.head(cached, tokens)
    torch.testing.assert_close(end_to_end, from_cache, atol=2e-2, rtol=2e-2)  # float16 store
    # the Lightning checkpoint loads into the same model
    from_ckpt = load_model(checkpoints / "best.ckpt")
    torch.testing.assert_close(from_ckpt(images, tokens), end_to_end)


def test_interrupted_training_resumes_from_last_checkpoint(world, monkeypatch):
    cfg = tiny_cfg(world, "model=lstm_cnn", "model.optim.max_epochs=3", "model.optim.patience=0")
    started_at = []
    original_start = lightning_module.VQALightningModule.on_train_start

    def record_start(self):
        started_at.append(self.current_epoch)
        return original_start(self)

    def crash_in_second_epoch(self):
        if self.current_epoch == 1:
            raise RuntimeError("killed")

    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_start", record_start)
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_end", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(cfg)
    last = world / "checkpoints/lstm_cnn/last.ckpt"
    assert last.is_file()
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_end", lambda self: None)
    metrics = train.run(cfg)
    assert started_at[0] == 0 and started_at[1] >= 1  # the second run did not start over
    assert metrics["epochs"] == 3 and not last.exists()


def test_changed_settings_do_not_resume(world, monkeypatch, caplog):
    cfg = tiny_cfg(world, "model=lstm_cnn", "model.optim.patience=0")

    def crash_in_second_epoch(self):  # the first epoch's last.ckpt is written by then
        if self.current_epoch == 1:
            raise RuntimeError("killed")

    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_end", crash_in_second_epoch)
    with pytest.raises(RuntimeError):
        train.run(cfg)
    assert (world / "checkpoints/lstm_cnn/last.ckpt").is_file()
    monkeypatch.setattr(lightning_module.VQALightningModule, "on_train_epoch_end", lambda self: None)
    with caplog.at_level(logging.WARNING):
        train.run(tiny_cfg(world, "model=lstm_cnn", "model.optim.patience=0", "model.optim.lr=0.001"))
    assert "other settings; starting afresh" in caplog.text


def test_nan_loss_stops_with_step_and_batch(world, monkeypatch):
    monkeypatch.setattr(lightning_module, "soft_cross_entropy",
                        lambda logits, scores: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 0, epoch 0, batch 0 \(dataset rows"):
        train.run(tiny_cfg(world, "model=mlb"))


def test_soft_cross_entropy_matches_definition():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])
    scores = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.9]])
    expected = (-(1.0 / 1.3) * torch.log_softmax(logits[0], 0)[0]
                - (0.3 / 1.3) * torch.log_softmax(logits[0], 0)[1]
                - torch.log_softmax(logits[2], 0)[2]) / 2  # the all-zero row is left out
    torch.testing.assert_close(lightning_module.soft_cross_entropy(logits, scores), expected)


def test_wandb_logs_offline(world):
    cfg = tiny_cfg(world, "model=lstm_cnn", "logger=wandb", "model.optim.max_epochs=1")
    train.run(cfg)
    runs = list((world / "logs" / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_ddp_over_two_cpu_processes(world):
    """Lightning DDP (gloo) launched by torchrun, as on a cluster: it trains, the loss falls,
    and the checkpoint it writes loads."""
    import csv
    import os
    import subprocess
    import sys

    out = world / "ddp"
    env = {**os.environ, "DDP_ACCELERATOR": "cpu", "DDP_PRECISION": "32-true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pipeline.train", "trainer=ddp", *TINY, "model=mlb", "model.optim.max_epochs=3",
         "model.optim.patience=0", "trainer.num_workers=0", f"paths.root={world}",
         f"paths.models_dir={out}/models", f"paths.metrics_dir={out}/metrics",
         f"paths.checkpoints_dir={out}/checkpoints",
         f"backbone.weights={world}/models/backbone/scene_resnet.pt",
         f"paths.log_dir={out}/logs"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics" / "train" / "mlb.json").read_text())
    assert metrics["val_questions"] == 60 and 0.0 <= metrics["val/acc"] <= 1.0
    rows = list(csv.DictReader(open(next((out / "logs" / "csv").rglob("metrics.csv")))))
    val_loss = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    # one row per epoch, then the final validation of the best checkpoint
    assert len(val_loss) == 4 and val_loss[2] < val_loss[0]
    model = load_model(out / "models" / "mlb" / "model.pt")
    assert model.name == "mlb" and not model.training
