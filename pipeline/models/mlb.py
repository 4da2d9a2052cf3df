"""MLB: multimodal low-rank bilinear attention network (Kim et al. 2017, "Hadamard product for
low-rank bilinear pooling"); the equations are numbered as in Kim et al., "Visual explanations
from Hadamard product in multimodal deep networks", which explains this model.

    q = GRU(q_emb) at the last real token                          (question feature)
    alpha = softmax_S( P_att^T ( tanh(U q 1^T) * tanh(W_a A) ) )  Eq. 4, G glimpses over S cells
    v_g = sum_s alpha_{g,s} A_s                                    Eq. 5
    Q = tanh(W_q q),  V = tanh(W_v [v_1; ...; v_G])
    F = Q * V                                                      Eq. 6 (Hadamard fusion)
    logits = P_o dropout(F) + b                                    Eq. 7
The skip-thought question encoder of the paper is replaced by a GRU trained from scratch (its
weights cannot be fetched here); its size is set in config.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from pipeline.models.analysis import AnalysisPoint, question_lengths
from pipeline.models.heads import register_head


@register_head("mlb")
class MLBHead(nn.Module):
    feature_kind = "grid"

    def __init__(self, vocab_size: int, num_answers: int, image_channels: int, embedding: int = 620,
                 hidden: int = 2400, attention: int = 1200, glimpses: int = 2, joint: int = 1200,
                 dropout: float = 0.5):
        super().__init__()
        self.glimpses = glimpses
        self.embedding = nn.Embedding(vocab_size, embedding, padding_idx=0)
        self.q_emb = AnalysisPoint("q_emb")
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.q = AnalysisPoint("q")
        self.conv = AnalysisPoint("conv")
        self.dropout = nn.Dropout(dropout)
        # Eq. 4: low-rank bilinear attention; 1x1 convolutions act on every grid cell.
        self.attention_question = nn.Linear(hidden, attention)
        self.attention_image = nn.Conv2d(image_channels, attention, 1)
        self.attention_glimpses = nn.Conv2d(attention, glimpses, 1)
        self.alpha = AnalysisPoint("alpha")
        # Eq. 6: the final Hadamard fusion.
        self.question_projection = nn.Linear(hidden, joint)
        self.image_projection = nn.Linear(glimpses * image_channels, joint)
        self.V, self.Q, self.F = AnalysisPoint("V"), AnalysisPoint("Q"), AnalysisPoint("F")
        self.classifier = nn.Linear(joint, num_answers)  # Eq. 7

    def encode_question(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.q_emb(self.embedding(tokens))
        packed = pack_padded_sequence(x, question_lengths(tokens).cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, h = self.gru(packed)
        return h[-1]

    def attend(self, grid: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Eq. 4: attention weights alpha, B x G x S (softmax over the S = h * w cells)."""
        joint = torch.tanh(self.attention_question(self.dropout(q)))[:, :, None, None] \
            * torch.tanh(self.attention_image(self.dropout(grid)))
        logits = self.attention_glimpses(joint).flatten(2)
        return self.alpha(torch.softmax(logits, dim=2))

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        grid = self.conv(grid)
        q = self.q(self.encode_question(tokens))
        alpha = self.attend(grid, q)
        attended = torch.einsum("bgs,bcs->bgc", alpha, grid.flatten(2))  # Eq. 5
        V = self.V(torch.tanh(self.image_projection(self.dropout(attended.flatten(1)))))
        Q = self.Q(torch.tanh(self.question_projection(self.dropout(q))))
        F = self.F(Q * V)  # Eq. 6
        return self.classifier(self.dropout(F))
