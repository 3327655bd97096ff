"""ONNX export of a trained model, onnxruntime inference, and the check of one against the other.

The exported graph is the model's forward pass: features (batch, frames, n_mels) float32 and
lengths (batch,) int64 in; log_probs (batch, frames', classes) and log_prob_lengths (batch,)
out, with batch and frames dynamic. Any nn.Module with forward(feats, lengths) → (log_probs,
lengths) exports the same way.

The file stands alone: its metadata (ONNX metadata_props, string to string) holds what
transcription needs besides the graph, so `ctcflow transcribe MODEL.onnx` reads nothing else.
Two groups of keys:
- sherpa-onnx's names, for other runtimes: model_type, version, model_author, comment,
  vocab_size (output classes, blank included), blank_id, subsampling_factor, feat_dim,
  normalize_type and the log-mel settings (sample_rate, n_fft, win_length, hop_length, n_mels,
  window_type);
- ctcflow's own, JSON values named as in a checkpoint (SETTINGS): tokenizer (Tokenizer.to_dict()),
  logmel, mean, std (the training split's per-bin statistics) and normalize (the per-utterance
  normalization after them); plus tokens, the class names in id order (the tokenizer's units,
  the blank as <blk>).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch.utils.data import DataLoader

from ctcflow.data import FeatureSplit, LengthBatchSampler, collate, frame_mask, normalization
from ctcflow.decoding import GreedyDecoder
from ctcflow.metrics import error_rates
from ctcflow.text import Tokenizer

INPUTS = ["features", "lengths"]
OUTPUTS = ["log_probs", "log_prob_lengths"]
# The checkpoint keys a .onnx file carries as JSON metadata: what transcription needs besides weights.
SETTINGS = ("tokenizer", "logmel", "mean", "std", "normalize")
MODEL_TYPE = "ctcflow_ctc"
BLANK_TOKEN = "<blk>"  # sherpa-onnx's name for the blank in tokens.txt
MAX_OPSET = 20  # the newest operator set torch's TorchScript exporter (dynamo=False) writes


def subsampling_factor(model, n_mels: int, device: torch.device | str = "cpu") -> int:
    """Input frames per output frame, measured on a long input rather than read from the
    architecture's settings, so any model (and its exported graph) answers the same way."""
    probe = 3000
    with torch.no_grad():
        out_lengths = model(torch.zeros(1, probe, n_mels, device=device), torch.tensor([probe], device=device))[1]
    return round(probe / int(out_lengths[0]))


def metadata(checkpoint: dict, model: torch.nn.Module, tokenizer: Tokenizer) -> dict[str, str]:
    """The metadata_props of the exported file (see the module's docstring)."""
    logmel = checkpoint["logmel"]
    tokens = list(tokenizer.alphabet)  # characters, words or pieces, as tokens.txt of sherpa-onnx lists them
    tokens.insert(tokenizer.blank, BLANK_TOKEN)
    sherpa = {
        "model_type": MODEL_TYPE, "version": "1", "model_author": "ctcflow",
        "comment": f"ctcflow {checkpoint['model_config']['arch']} CTC model, epoch {checkpoint.get('epoch')}",
        "vocab_size": tokenizer.num_classes, "blank_id": tokenizer.blank,
        "subsampling_factor": subsampling_factor(model, checkpoint["n_mels"]), "feat_dim": checkpoint["n_mels"],
        "normalize_type": normalization(checkpoint), "window_type": "hann", **logmel,
    }
    ours = {"tokenizer": tokenizer.to_dict(), "logmel": logmel, "mean": checkpoint["mean"], "std": checkpoint["std"],
            "normalize": normalization(checkpoint), "tokens": tokens}
    return {**{k: str(v) for k, v in sherpa.items()}, **{k: json.dumps(v) for k, v in ours.items()}}


def export_onnx(checkpoint: dict, model: torch.nn.Module, tokenizer: Tokenizer, out: str | Path,
                opset: int) -> dict[str, str]:
    """Write `model` (built from `checkpoint`, in eval mode) to `out` with its metadata; return the metadata.

    Traced (torch.onnx.export, dynamo=False: the torch.export-based exporter needs onnxscript, which
    is not a dependency) on a batch of two utterances of different lengths, so the graph computes
    lengths and padding masks from its inputs rather than fixing them."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    n_mels = checkpoint["n_mels"]
    example = (torch.randn(2, 200, n_mels), torch.tensor([200, 150]))
    with warnings.catch_warnings():
        # The tracer warns that LSTM shape checks become constants and that LSTM states may fix the
        # batch size; tests/test_export.py runs the graph on other batch sizes and lengths.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(model, example, str(out), input_names=INPUTS, output_names=OUTPUTS, opset_version=opset,
                          dynamic_axes={"features": {0: "batch", 1: "frames"}, "lengths": {0: "batch"},
                                        "log_probs": {0: "batch", 1: "out_frames"}, "log_prob_lengths": {0: "batch"}},
                          dynamo=False)
    meta = metadata(checkpoint, model, tokenizer)
    write_metadata(out, meta)
    return meta


def write_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx  # here: its import takes most of a second, which `ctcflow transcribe` need not pay

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    onnx.helper.set_model_props(graph, meta)
    onnx.save(graph, str(path))


def quantize_int8(fp32: str | Path, out: str | Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights (QInt8), activations quantized per batch at
    run time; the metadata is copied over."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # 7-bit weights: on CPUs without VNNI (AVX2 only) 8-bit products saturate their int16 sums, and
    # the tiny test model's log-probabilities moved by 0.057 instead of 0.004.
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, reduce_range=True)
    write_metadata(Path(out), read_metadata(fp32))


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}


class OnnxModel:
    """An exported model run by onnxruntime on the CPU, called like the PyTorch model:
    (feats, lengths) tensors in, (log_probs, lengths) tensors out.

    settings: what the file's metadata says of features and units, keyed as in a checkpoint."""

    def __init__(self, path: str | Path, num_threads: int | None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found")
        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's errors derive from Exception alone (InvalidProtobuf, Fail, ...)
            raise ValueError(f"{path}: onnxruntime cannot load it ({err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("model_type", *SETTINGS) if k not in meta]
        if missing or meta["model_type"] != MODEL_TYPE:
            raise ValueError(f"{path}: not a model `ctcflow export` wrote (model_type "
                             f"{meta.get('model_type')!r}; missing metadata {missing})")
        self.settings = {k: json.loads(meta[k]) for k in SETTINGS}
        self.tokenizer = Tokenizer(**self.settings["tokenizer"])

    def __call__(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, out_lengths = self.session.run(OUTPUTS, {"features": feats.cpu().numpy().astype(np.float32),
                                                            "lengths": lengths.cpu().numpy().astype(np.int64)})
        return torch.from_numpy(log_probs), torch.from_numpy(out_lengths)


@dataclass
class Parity:
    """PyTorch against onnxruntime on one split, greedy decoding without a blank penalty."""

    utterances: int
    max_abs_logprob_diff: float  # over the real output frames of every utterance
    differing_transcripts: int  # utterances whose greedy transcripts differ
    wer_torch: float
    wer_onnx: float

    @property
    def greedy_identical(self) -> float:
        """Share of utterances with the same greedy transcript."""
        return 1 - self.differing_transcripts / self.utterances

    def describe(self, name: str) -> str:
        return (f"{name}: largest |log-prob difference| {self.max_abs_logprob_diff:.2e}; greedy transcripts differ "
                f"on {self.differing_transcripts} of {self.utterances} utterances; greedy WER {self.wer_onnx:.2%} "
                f"(PyTorch {self.wer_torch:.2%})")


@torch.no_grad()
def check_parity(model: torch.nn.Module, onnx_model: OnnxModel, split: FeatureSplit, batch_frames: int) -> Parity:
    """Both run on the same padded batches (the split's, length-bucketed within batch_frames)."""
    model.eval()
    tokenizer = onnx_model.tokenizer
    loader = DataLoader(split, batch_sampler=LengthBatchSampler(split.num_frames, batch_frames, shuffle=False),
                        collate_fn=collate)
    decode = GreedyDecoder(tokenizer, blank_penalty=0.0)
    theirs, ours = [""] * len(split), [""] * len(split)
    largest = 0.0
    for batch in loader:
        expected, lengths = model(batch.feats, batch.lengths)
        got, got_lengths = onnx_model(batch.feats, batch.lengths)
        if not torch.equal(lengths, got_lengths):
            raise AssertionError(f"output lengths differ: {lengths.tolist()} from PyTorch, {got_lengths.tolist()} "
                                 "from onnxruntime")
        real = frame_mask(lengths, expected.shape[1])
        largest = max(largest, float((expected - got).abs()[real].max()))
        for i, a, b in zip(batch.indices, decode(expected, lengths), decode(got, got_lengths)):
            theirs[i], ours[i] = a, b
    references = split.index["text_normalized"].tolist()
    return Parity(len(split), largest, sum(a != b for a, b in zip(theirs, ours)),
                  error_rates(references, theirs)["wer"], error_rates(references, ours)["wer"])
