"""LSTM-CNN, "Deeper LSTM Q + norm I" (Antol et al. 2015; the model Goyal et al. explain).

    q_emb = W_e x_t                      (embedding, then dropout and tanh)
    [c1, h1, c2, h2] = 2-layer LSTM final states             -> q (question feature)
    i = pooled conv feature / ||.||_2                        (norm I)
    V = tanh(W_i i),  Q = tanh(W_q q),  F = Q * V            (element-wise fusion)
    logits = W_o dropout(F)
"""
from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from pipeline.models.analysis import AnalysisPoint, question_lengths


class LSTMCNNHead(nn.Module):
    """Everything after the backbone. Reads the grid (end to end) or the pooled feature (training
    on cached features): both go through the same pooling-free code after ``conv``."""

    name = "lstm_cnn"
    feature_kind = "pooled"  # what training reads from the feature store

    def __init__(self, vocab_size: int, num_answers: int, image_channels: int, embedding: int = 200,
                 hidden: int = 512, layers: int = 2, joint: int = 1024, dropout: float = 0.5):
        super().__init__()
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

    def forward(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if image_features.dim() == 4:  # B x C x h x w grid from the backbone
            image_features = self.conv(image_features).mean(dim=(2, 3))
        i = nnf.normalize(image_features, dim=1)
        q = self.q(self.encode_question(tokens))
        V = self.V(torch.tanh(self.image_projection(i)))
        Q = self.Q(torch.tanh(self.question_projection(q)))
        F = self.F(Q * V)
        return self.classifier(self.fusion_dropout(F))
