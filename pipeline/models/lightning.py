"""The LightningModule that trains a VQA head on cached backbone features."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as nnf

from pipeline.data.answers import vqa_accuracy
from pipeline.models.heads import build_head

ANSWER_TYPE_KEYS = {"yes/no": "yes_no", "number": "number", "other": "other"}


def soft_cross_entropy(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the human answers: -sum_a t_a log softmax(logits)_a with
    t = scores / sum(scores), the soft target of the 10 answers (questions whose answers are all
    outside the vocabulary carry no signal and are left out of the mean)."""
    total = scores.sum(1)
    keep = total > 0
    if not keep.any():
        return logits.sum() * 0.0
    target = scores[keep] / total[keep, None]
    return -(target * nnf.log_softmax(logits[keep], dim=1)).sum(1).mean()


class VQALightningModule(pl.LightningModule):
    """``metadata`` (see :func:`pipeline.models.checkpoint.model_metadata`) goes into the
    checkpoint's hyper-parameters, so a checkpoint alone rebuilds the model."""

    def __init__(self, metadata: dict, optim: dict, image_channels: int,
                 val_answers: list[list[str]] | None = None, val_answer_types: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters({**metadata, "optim": dict(optim), "image_channels": int(image_channels)})
        self.optim = dict(optim)
        m = metadata["model"]
        self.head = build_head(m["name"], m["arch"], len(metadata["question_vocab"]),
                               len(metadata["answer_vocab"]), image_channels)
        self.answers = list(metadata["answer_vocab"])
        # Human answers of the validation questions, for the official accuracy (by dataset index).
        self.val_answers = val_answers or []
        self.val_answer_types = val_answer_types or []

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(features, tokens)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["features"], batch["tokens"])
        loss = soft_cross_entropy(logits, batch["scores"])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step}, epoch "
                f"{self.current_epoch}, batch {batch_idx} (dataset rows "
                f"{batch['index'][:8].tolist()}...): stopping; lower model.optim.lr or check the "
                "features of these rows")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["features"], batch["tokens"])
        n = len(logits)
        self.log("val/loss", soft_cross_entropy(logits, batch["scores"]), batch_size=n, sync_dist=True)
        predicted = logits.argmax(1).tolist()
        accuracy, by_type = [], {}
        for index, answer_id in zip(batch["index"].tolist(), predicted):
            acc = vqa_accuracy(self.answers[answer_id], self.val_answers[index])
            accuracy.append(acc)
            by_type.setdefault(self.val_answer_types[index], []).append(acc)
        self.log("val/acc", sum(accuracy) / n, prog_bar=True, batch_size=n, sync_dist=True)
        for answer_type, key in ANSWER_TYPE_KEYS.items():
            values = by_type.get(answer_type)
            if values:
                self.log(f"val/acc_{key}", sum(values) / len(values), batch_size=len(values),
                         sync_dist=True)

    # torch's random states in the checkpoint, so that a run resumed from last.ckpt draws the
    # same dropout masks as one never interrupted (Lightning saves none by default; training
    # draws from no other generator). The shuffle order travels with the datamodule's state
    # (pipeline.data.datamodule).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if not states:   # a checkpoint written before random states were saved
            return
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    def configure_optimizers(self):
        name = self.optim["name"].lower()
        params = [p for p in self.parameters() if p.requires_grad]
        lr, wd = float(self.optim["lr"]), float(self.optim.get("weight_decay", 0.0))
        if name == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
        elif name == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        elif name == "rmsprop":
            opt = torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
        else:
            raise ValueError(f"model.optim.name must be adam, adamw or rmsprop, got {name!r}")
        decay = self.optim.get("lr_decay")
        if not decay:
            return opt
        # Step decay, as in the papers' training schedules (e.g. x0.5 every few epochs).
        schedule = torch.optim.lr_scheduler.StepLR(opt, int(decay["every_epochs"]), float(decay["factor"]))
        return {"optimizer": opt, "lr_scheduler": schedule}
