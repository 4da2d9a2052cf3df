"""The end-to-end VQA model: pixels and token ids in, answer logits out.

``VQAModel = backbone (frozen) -> head``. Training runs the head on cached backbone features;
explaining runs the whole model from pixels. Both use the same head code, so what is explained
is exactly what was trained.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.data.vocab import AnswerVocab, QuestionVocab, pad_token_ids, tokenize
from pipeline.models.analysis import AnalysisPoint, analysis_points, warn_degenerate_questions
from pipeline.models.backbones import Backbone


class VQAModel(nn.Module):
    """``forward(images, question_tokens) -> logits``: images B x 3 x H x W normalised as
    ``backbone.mean/std``, tokens B x T ids of ``question_vocab`` (0 = padding at the end).

    ``question_mark``: whether the model was trained on questions with "?" as a token
    (``data.question_mark``); text questions are tokenised the same way. False is the
    tokenisation of models made before the setting existed."""

    def __init__(self, backbone: Backbone, head: nn.Module, question_vocab: QuestionVocab,
                 answer_vocab: AnswerVocab, max_question_length: int, question_mark: bool = False):
        super().__init__()
        self.image = AnalysisPoint("image")
        self.backbone = backbone
        self.head = head
        self.question_vocab = question_vocab
        self.answer_vocab = answer_vocab
        self.max_question_length = int(max_question_length)
        self.question_mark = bool(question_mark)
        if head.feature_kind == "fc7":
            # The head computes fc7 from the grid with the backbone's own layers. A bound
            # method, so that a deep copy of the model reads its own copy of the backbone.
            head.read_grid_with(backbone.fc7)

    @property
    def name(self) -> str:
        return self.head.name

    def forward(self, images: torch.Tensor, question_tokens: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and not self.training:
            warn_degenerate_questions(question_tokens, self.question_vocab.pad_id,
                                      self.question_vocab.unk_id)
        return self.head(self.backbone(self.image(images)), question_tokens)

    def analysis_points(self) -> dict[str, AnalysisPoint]:
        return analysis_points(self)

    def tokenize(self, question: str) -> list[str]:
        """The tokens of a text question, tokenised as the model's training questions were."""
        return tokenize(question, question_mark=self.question_mark)

    def encode_questions(self, questions: Sequence[str]) -> torch.Tensor:
        """Token ids, B x T (padded), of questions given as text (tokenised by :meth:`tokenize`)."""
        return pad_token_ids([self.question_vocab.encode(self.tokenize(q), self.max_question_length)
                              for q in questions])

    def answers(self, logits: torch.Tensor) -> list[str]:
        """The answer strings of the highest-scoring classes."""
        return [self.answer_vocab.answers[i] for i in logits.argmax(1).tolist()]
