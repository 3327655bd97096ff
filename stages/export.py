"""Stage export: the trained model as ONNX for onnxruntime, checked against PyTorch on the test split.

Writes export/model.onnx (float32; dynamic batch and time axes; the feature settings, units and
normalization in its metadata, so the file stands alone: docs/export.md) and, with export.int8,
export/model.int8.onnx (onnxruntime's dynamic quantization: int8 weights). Then runs PyTorch and
each ONNX file on the same batches of the test split and writes metrics/export.json: the largest
absolute difference in log-probabilities over real frames, the number (and share) of utterances
whose greedy transcripts differ from PyTorch's, each one's greedy test WER, and the file sizes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ctcflow.checkpoint import check_features, load_model
from ctcflow.data import FeatureSplit
from ctcflow.export import MAX_OPSET, OnnxModel, check_parity, export_onnx, quantize_int8
from ctcflow.params import Section
from stages.runner import StageError, stage_main

MODEL_DIR = Path("models")
FEATURES_DIR = Path("data/features")
OUT_DIR = Path("export")
METRICS_FILE = Path("metrics/export.json")


class ExportParams(Section):
    checkpoint: Literal["best", "best_epoch", "last"]  # models/{checkpoint}.pt
    # The ONNX operator set; below 17, LayerNormalization is exported as its parts.
    opset: int = Field(ge=14, le=MAX_OPSET)
    int8: bool
    batch_frames: int = Field(gt=0)
    num_threads: int = Field(ge=1)


def run(params: ExportParams, model_dir: Path = MODEL_DIR, features_dir: Path = FEATURES_DIR,
        out_dir: Path = OUT_DIR, metrics_file: Path = METRICS_FILE) -> dict:
    torch.set_num_threads(params.num_threads)
    checkpoint_file = model_dir / f"{params.checkpoint}.pt"
    checkpoint, model, tokenizer = load_model(checkpoint_file, also=("epoch",))
    # Before the old export/ goes. Not tokens.json, no dep of this stage: the test split's
    # transcripts must be spelled in the checkpoint's units instead.
    check_features(checkpoint, features_dir, str(checkpoint_file), units=False)
    try:
        test = FeatureSplit(features_dir, "test", tokenizer)
    except ValueError as err:
        raise StageError(f"{features_dir / 'test'} does not fit the label units of {checkpoint_file}: {err}") from err
    shutil.rmtree(out_dir, ignore_errors=True)  # an int8 file of an earlier run must not outlive int8: false
    files = {"fp32": out_dir / "model.onnx"}
    export_onnx(checkpoint, model, tokenizer, files["fp32"], params.opset)
    if params.int8:
        files["int8"] = out_dir / "model.int8.onnx"
        quantize_int8(files["fp32"], files["int8"])

    metrics: dict = {"checkpoint_epoch": checkpoint["epoch"], "opset": params.opset, "utterances": len(test)}
    for name, path in files.items():
        parity = check_parity(model, OnnxModel(path, params.num_threads), test, params.batch_frames)
        metrics["pytorch_wer"] = parity.wer_torch
        metrics[name] = {"max_abs_logprob_diff": parity.max_abs_logprob_diff,
                         "differing_transcripts": parity.differing_transcripts,
                         "greedy_identical": parity.greedy_identical, "wer": parity.wer_onnx,
                         "size_mb": round(path.stat().st_size / 1e6, 3)}
        print(parity.describe(str(path)))
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    # `ctcflow export` is the command that exports any checkpoint (stages/cli.py), not this stage.
    stage_main("export", ExportParams, run, __doc__, argv, prog="python -m stages.export")


if __name__ == "__main__":
    main()
