"""Checkpoints: weights plus everything needed to rebuild the model and read its output.

Loading is always `torch.load(weights_only=True)`: a checkpoint is data (tensors, numbers,
strings), never code to execute. So everything saved here is kept to those types, the
random-number-generator states included.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from ctcflow.errors import CtcflowError
from ctcflow.model import ARCHITECTURE_KEYS, build_model
from ctcflow.text import Tokenizer


class CheckpointError(CtcflowError):
    """A checkpoint cannot be read, or does not fit the model it is meant for."""


def save_checkpoint(path: str | Path, **content) -> None:
    """Write atomically, so a killed process never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(content, tmp)
    os.replace(tmp, path)


def average_weights(states: list[dict]) -> dict:
    """The element-wise mean of several epochs' weights (icefall's checkpoint averaging), in float64
    then back to each tensor's type; non-float tensors come from the newest. One state comes back
    as it is. By hand: torch's AveragedModel averages a live model's steps, not saved epochs."""
    if len(states) == 1:
        return states[0]
    newest = states[-1]
    return {name: (sum(state[name].double() for state in states) / len(states)).to(value.dtype)
            if value.is_floating_point() else value for name, value in newest.items()}


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        # weights_only: a checkpoint is data, never code to execute.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        # torch's message is long and suggests weights_only=False; keep only the reason.
        lines = [line.strip() for line in str(err).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
        reason = lines[0] if lines else type(err).__name__
        raise CheckpointError(f"{path}: not a checkpoint that loads with weights_only=True ({reason})") from err


def check_compatible(checkpoint: dict, model_config: dict, tokenizer: Tokenizer, n_mels: int, source: str) -> None:
    """Refuse, with every difference named, weights that another architecture or vocabulary produced.

    Only the keys that shape the weights count: dropout and the keys the architecture ignores
    may differ.
    """
    theirs = checkpoint.get("model_config", {})
    shape = ["arch", *(k for k in ARCHITECTURE_KEYS[model_config["arch"]] if k != "dropout")]
    differ = [f"{k}: {theirs.get(k)!r} there, {model_config[k]!r} here" for k in shape if theirs.get(k) != model_config[k]]
    if checkpoint.get("tokenizer") != tokenizer.to_dict():
        differ.append(f"vocabulary: {checkpoint.get('tokenizer')!r} there, {tokenizer.to_dict()!r} here")
    if checkpoint.get("n_mels") != n_mels:
        differ.append(f"n_mels: {checkpoint.get('n_mels')!r} there, {n_mels!r} here")
    if differ:
        raise CheckpointError(f"{source}: cannot load weights into this model ({', '.join(differ)})")


def model_from_checkpoint(checkpoint: dict) -> tuple[torch.nn.Module, Tokenizer]:
    tokenizer = Tokenizer(**checkpoint["tokenizer"])
    model = build_model(checkpoint["model_config"], checkpoint["n_mels"], tokenizer.num_classes)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), tokenizer


def rng_state() -> dict:
    """Every random stream training draws from, as tensors and numbers (weights_only-safe)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
