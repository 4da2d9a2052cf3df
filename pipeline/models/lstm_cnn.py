"""LSTM-CNN, "Deeper LSTM Q + norm I" (Antol et al. 2015; the model Goyal et al. explain).

    q_emb = W_e x_t                      (embedding, then dropout and tanh)
    [c1, h1, c2, h2] = 2-layer LSTM final states             -> q (question feature)
    i = fc7(conv) / ||fc7(conv)||_2                          (norm I)
    V = tanh(W_i i),  Q = tanh(W_q q),  F = Q * V            (element-wise fusion)
    logits = W_o dropout(F)

``image_feature`` says what ``i`` normalises: ``fc7`` (the paper's choice: VGG's fc7, here the
backbone's fc6-fc7 layers on its grid, or pool5 on ResNet) or ``pooled`` (the grid's spatial
mean, which this project used before). With ``pooled`` the score is exactly invariant to scaling
the grid, y(s A) = y(A), so the signed Grad-CAM map sums to zero on every question (Euler's
theorem, docs/evaluation.md); fc6/fc7's biases and ReLUs break that invariance.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as nnf
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from pipeline.models.analysis import AnalysisPoint, question_lengths
from pipeline.models.heads import register_head


@register_head("lstm_cnn")
class LSTMCNNHead(nn.Module):
    """Everything after the backbone. Reads the grid (end to end) or the cached image vector
    (training): both go through the same code after the vector is computed.

    The vector comes from the grid through the *backbone's* frozen layers (fc6-fc7 belong to the
    CNN, as in VGG, and are saved with it): :class:`~pipeline.models.vqa_model.VQAModel` hands
    them to the head with :meth:`read_grid_with`. ``image_channels`` is the vector's width."""

    def __init__(self, vocab_size: int, num_answers: int, image_channels: int, embedding: int = 200,
                 hidden: int = 512, layers: int = 2, joint: int = 1024, dropout: float = 0.5,
                 image_feature: str = "fc7"):
        super().__init__()
        if image_feature not in ("fc7", "pooled"):
            raise ValueError(f"model.arch.image_feature is fc7 or pooled, got {image_feature!r}")
        self.feature_kind = image_feature  # what training reads from the feature store
        self._image_vector = None
        self.embedding = nn.Embedding(vocab_size, embedding, padding_idx=0)
        self.q_emb = AnalysisPoint("q_emb")
        self.embedding_dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.q = AnalysisPoint("q")
        self.conv = AnalysisPoint("conv")
        self.image_projection = nn.Linear(image_channels, joint)
        self.question_projection = nn.Linear(2 * layers * hidden, joint)
        self.V, self.Q, self.F = AnalysisPoint("V"), AnalysisPoint("Q"), AnalysisPoint("F")
        self.fusion_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(joint, num_answers)

    def encode_question(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.embedding_dropout(self.q_emb(self.embedding(tokens))))
        packed = pack_padded_sequence(x, question_lengths(tokens).cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, (h, c) = self.lstm(packed)  # layers x B x hidden each, at each question's true length
        # [c1, h1, c2, h2]: cell and hidden state of every layer, as in "Deeper LSTM Q".
        return torch.cat([t for layer in zip(c, h) for t in layer], dim=1)

    @staticmethod
    def feature_kind_of(arch: dict) -> str:
        """What a head with architecture ``arch`` reads from the feature store."""
        return str(dict(arch).get("image_feature", "fc7"))

    def read_grid_with(self, image_vector: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Use ``image_vector(grid) -> B x image_channels`` (the backbone's fc7 or pool5) when
        given a grid. Kept as a plain attribute, not a submodule: its weights are the backbone's
        and are saved with the backbone, not twice."""
        self._image_vector = image_vector

    def forward(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if image_features.dim() == 4:  # B x C x h x w grid from the backbone
            grid = self.conv(image_features)
            if self.feature_kind == "pooled":
                image_features = grid.mean(dim=(2, 3))
            elif self._image_vector is None:
                raise RuntimeError("this lstm_cnn head reads fc7 and was given a grid without "
                                   "the backbone's fc layers: assemble it in a VQAModel")
            else:
                image_features = self._image_vector(grid)
        i = nnf.normalize(image_features, dim=1)
        q = self.q(self.encode_question(tokens))
        V = self.V(torch.tanh(self.image_projection(i)))
        Q = self.Q(torch.tanh(self.question_projection(q)))
        F = self.F(Q * V)
        return self.classifier(self.fusion_dropout(F))
