"""Training data: questions from the processed tables, image features from the feature store.

The question side (token ids, answer scores) is small and lives in memory as tensors; the image
side is read lazily, one batch at a time, from the memory-mapped feature store, so memory does
not grow with the number of images.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data import processed
from pipeline.data.feature_store import FeatureStore
from pipeline.data.vocab import AnswerVocab, pad_token_ids


class VQAFeatureDataset(Dataset):
    """Items: dict(index, features, tokens, scores). ``feature_kind`` is "grid", "pooled" or
    "fc7" (what the head reads; :meth:`FeatureStore.read`).

    ``scores`` is the soft target over the answer vocabulary: the official VQA accuracy each
    answer would earn (:func:`pipeline.data.answers.answer_scores`), 0 outside the vocabulary.
    It is kept sparse per question (VQA has 443k questions x 2000 answers)."""

    def __init__(self, records: list[dict], store: FeatureStore, feature_kind: str,
                 answer_vocab: AnswerVocab, max_length: int):
        if feature_kind not in ("grid", "pooled", "fc7"):
            raise ValueError(f"feature_kind must be 'grid', 'pooled' or 'fc7', got {feature_kind!r}")
        self.store = store
        self.feature_kind = feature_kind
        self.num_answers = len(answer_vocab)
        self.tokens = pad_token_ids([r["token_ids"] for r in records], max_length)
        self.answer_columns, self.answer_values = [], []
        for r in records:
            kept = [(answer_vocab.index[a], s) for a, s in r["answer_scores"].items()
                    if a in answer_vocab.index and s > 0]
            self.answer_columns.append(torch.tensor([c for c, _ in kept], dtype=torch.long))
            self.answer_values.append(torch.tensor([s for _, s in kept], dtype=torch.float32))
        self.rows = torch.tensor([store.row_of(r["image_id"]) for r in records], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        row = int(self.rows[index])
        scores = torch.zeros(self.num_answers)
        scores[self.answer_columns[index]] = self.answer_values[index]
        return {"index": index, "features": self.store.read(self.feature_kind, [row])[0],
                "tokens": self.tokens[index],
                "scores": scores}


class VQADataModule(pl.LightningDataModule):
    """Train and val datasets of one model: its feature kind, its answer vocabulary."""

    def __init__(self, processed_dir: str | Path, features_dir: str | Path, feature_kind: str,
                 answer_vocab: AnswerVocab, max_length: int, batch_size: int, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.features_dir = Path(features_dir)
        self.feature_kind = feature_kind
        self.answer_vocab = answer_vocab
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.records: dict[str, list[dict]] = {}
        self.datasets: dict[str, VQAFeatureDataset] = {}
        # One shuffle generator for the whole fit: each epoch draws its order from it, and its
        # state travels in the checkpoint (state_dict), so a resumed run continues the sequence
        # instead of restarting it at epoch 0's order.
        self.shuffle_generator = torch.Generator().manual_seed(self.seed)

    def setup(self, stage: str | None = None) -> None:
        for key in ("train", "val"):
            if key in self.datasets:
                continue
            self.records[key] = processed.load_question_table(self.processed_dir, key)
            store = FeatureStore.open(self.features_dir, key)
            self.datasets[key] = VQAFeatureDataset(self.records[key], store, self.feature_kind,
                                                   self.answer_vocab, self.max_length)

    def _loader(self, key: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[key], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=self.shuffle_generator if shuffle else None)

    def state_dict(self) -> dict:
        """Saved by Lightning in every checkpoint."""
        return {"shuffle_generator": self.shuffle_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restored by Lightning on resume (in place: a loader already holding the generator
        continues from the restored state)."""
        if "shuffle_generator" in state:
            self.shuffle_generator.set_state(state["shuffle_generator"])

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
