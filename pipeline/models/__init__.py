"""Backbones, the two VQA models (LSTM-CNN, MLB), their analysis points, training and loading."""
# Imported first, so that every head is registered (pipeline.models.heads) whatever part of
# pipeline.models is imported.
import pipeline.models.lstm_cnn  # noqa: F401
import pipeline.models.mlb  # noqa: F401
from pipeline.models.checkpoint import load_model, load_trained_model

__all__ = ["load_model", "load_trained_model"]
