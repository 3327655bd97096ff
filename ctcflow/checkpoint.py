"""Checkpoints: weights plus everything needed to rebuild the model and read its output.

Loading is always `torch.load(weights_only=True)`: a checkpoint is data (tensors, numbers,
strings), never code to execute. So everything saved here is kept to those types, the
random-number-generator states included.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ctcflow.data import read_feature_info
from ctcflow.errors import CtcflowError
from ctcflow.model import ARCHITECTURE_KEYS, build_model
from ctcflow.text import TOKENS_FILE, Tokenizer


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
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory: name a checkpoint file in it, e.g. {path / 'best.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: an empty file, not a checkpoint")
    try:
        # weights_only: a checkpoint is data, never code to execute.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # garbage raises almost anything (IndexError, ValueError, KeyError, ...)
        raise CheckpointError(f"{path}: not a checkpoint that loads with weights_only=True ({_reason(err)})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint's dict")
    return checkpoint


def _reason(err: Exception) -> str:
    """torch's message in one short line: it is long and suggests weights_only=False."""
    lines = [line.strip() for line in str(err).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
    reason = re.sub(r"^\[enforce fail at [^]]*\]\s*\.?\s*", "", lines[0]) if lines else ""
    reason = reason.split(". ")[0]  # what follows is advice (file corrupted, weights_only)
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


# What evaluate, transcribe and export read from a model checkpoint (train writes them all; the
# resume checkpoint too). "normalize" may be missing: older checkpoints normalized globally.
BUILD_KEYS = ("model", "model_config", "tokenizer", "n_mels")
MODEL_KEYS = (*BUILD_KEYS, "logmel", "mean", "std")


def require_keys(checkpoint: dict, keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{source}: not a model checkpoint: it lacks {', '.join(missing)}")


def load_model(path: str | Path, also: tuple[str, ...] = ()) -> tuple[dict, torch.nn.Module, Tokenizer]:
    """A model checkpoint with every key of MODEL_KEYS (and `also`), and its model in eval mode."""
    checkpoint = load_checkpoint(path)
    require_keys(checkpoint, (*MODEL_KEYS, *also), str(path))
    return checkpoint, *model_from_checkpoint(checkpoint, str(path))


def _units(units: dict) -> str:
    """A character alphabet as it is; words and BPE pieces (and their sentencepiece model) by count."""
    alphabet = units.get("alphabet", "")
    return repr(alphabet) if units.get("unit") == "char" else f"{len(alphabet)} {units.get('unit')} units"


def check_features(checkpoint: dict, features_dir: str | Path, source: str, units: bool = True) -> None:
    """Refuse a feature store the checkpoint's model cannot read: other log-mel bins (n_mels of
    features.json) or, with `units`, other label units (tokens.json); before any decoding."""
    features_dir = Path(features_dir)
    theirs = read_feature_info(features_dir)["logmel"]["n_mels"]
    differ = [] if checkpoint["n_mels"] == theirs else [
        f"n_mels: {checkpoint['n_mels']} in {source}, {theirs} in {features_dir / 'features.json'}"]
    if units:
        tokens = features_dir / TOKENS_FILE
        if not tokens.is_file():
            raise FileNotFoundError(f"{tokens} not found (the manifest stage writes it, featurize copies it)")
        ours = Tokenizer(**checkpoint["tokenizer"]).units_dict()
        stored = json.loads(tokens.read_text())
        if stored != ours:
            differ.append(f"label units: {_units(ours)} in {source}, {_units(stored)} in {tokens}")
    if differ:
        raise CheckpointError(f"{source} does not fit the features of {features_dir} ({'; '.join(differ)}): "
                              "rerun manifest and featurize with the settings it was trained on, or train again")


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


def model_from_checkpoint(checkpoint: dict, source: str = "checkpoint") -> tuple[torch.nn.Module, Tokenizer]:
    require_keys(checkpoint, BUILD_KEYS, source)
    try:
        tokenizer = Tokenizer(**checkpoint["tokenizer"])
        model = build_model(checkpoint["model_config"], checkpoint["n_mels"], tokenizer.num_classes)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: cannot rebuild its model ({type(err).__name__}: {err})") from err
    load_weights(model, checkpoint["model"], source)
    return model.eval(), tokenizer


def load_weights(model: torch.nn.Module, weights: dict, source: str) -> None:
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{source}: its weights do not fit its own model_config ({_mismatches(err)})") from err


def _mismatches(err: Exception, shown: int = 3) -> str:
    """load_state_dict's error, a line per mismatch, as one short line: the first few, then a count.
    Missing and unexpected keys come as one line each listing every name (hundreds for another
    architecture): a count and the first few names."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
    lines = [re.sub(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from checkpoint, "
                    r"the shape in current model is torch.Size\((\[.*?\])\)\.?", r"\1: \2 saved, \3 built", line)
             for line in lines]
    lines = [_key_list(line, shown) for line in lines]
    more = f"; {len(lines) - shown} more" if len(lines) > shown else ""
    return "; ".join(lines[:shown]) + more


def _key_list(line: str, shown: int) -> str:
    listed = re.match(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)", line)
    if not listed:
        return line
    names = re.findall(r'"([^"]+)"', listed.group(2))
    more = f", {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} {listed.group(1).lower()} key(s): {', '.join(names[:shown])}{more}"


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
