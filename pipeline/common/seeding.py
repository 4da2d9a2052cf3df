"""One seed for everything a stage draws: Python, NumPy, torch, dataloader workers."""
from __future__ import annotations

import torch
from pytorch_lightning import seed_everything as lightning_seed_everything


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Lightning's ``seed_everything`` (workers included) and, with ``deterministic``,
    deterministic torch kernels: the same seed gives the same tables on the same machine."""
    lightning_seed_everything(seed, workers=True, verbose=False)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
