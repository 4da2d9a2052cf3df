"""Backbones, the two VQA models (LSTM-CNN, MLB), their analysis points, training and loading."""
from pipeline.models.checkpoint import load_model, load_trained_model

__all__ = ["load_model", "load_trained_model"]
