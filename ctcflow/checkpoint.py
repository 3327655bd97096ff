"""Checkpoints: weights plus everything needed to rebuild the model and read its output."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ctcflow.model import build_model
from ctcflow.text import Tokenizer


def save_checkpoint(path: str | Path, **content) -> None:
    """Write atomically, so a killed process never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(content, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    # weights_only: a checkpoint is data, never code to execute.
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(checkpoint: dict) -> tuple[torch.nn.Module, Tokenizer]:
    tokenizer = Tokenizer(**checkpoint["tokenizer"])
    model = build_model(checkpoint["model_config"], checkpoint["n_mels"], tokenizer.num_classes)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), tokenizer
