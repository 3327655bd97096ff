"""Transcribe audio files with a trained checkpoint (the `ctcflow transcribe MODEL AUDIO...` command).

Files of any length and sample rate are read in fixed windows of `chunk_seconds` (so memory
does not grow with the file), consecutive windows overlapping by `overlap_seconds`. Features
are computed exactly as the featurize stage does (the checkpoint's log-mel settings, then the
training split's mean and std, then the checkpoint's per-utterance normalization, if any).
Windows from all files go through the model in batches.

Per-utterance normalization (featurize.normalize: utterance_mean, utterance_mean_var) uses the
statistics of each window: a file no longer than `chunk_seconds` is one window and is normalized
as evaluate normalizes a test utterance; a longer file is normalized window by window.

Words at window borders: each window owns the stretch from the middle of its overlap with the
previous window to the middle of its overlap with the next, and a word is kept by the window
that owns the midpoint of its aligned span. A word shorter than the overlap and cut by one
window's edge has its visible midpoint in that window's overlap, outside what it owns, and lies
whole in the neighbouring window, which keeps it.

Word times come from the CTC alignment: output frame × model time stride × hop / sample rate.

MODEL is a checkpoint (.pt), run by PyTorch, or a file `ctcflow export` wrote (.onnx), run by
onnxruntime on the CPU: the same features (from the file's metadata), decoders and word timings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import soundfile
import torch

from ctcflow.audio import check_peak, read_info, resample
from ctcflow.checkpoint import load_model
from ctcflow.data import normalization, normalize_utterance
from ctcflow.decoding import BeamParams, GreedyDecoder, Word, align_words
from ctcflow.export import OnnxModel, subsampling_factor
from ctcflow.features import LogMel, LogMelConfig


def check_device(device: str, onnx: bool = False) -> torch.device:
    """cpu, or a CUDA device this machine has (for a checkpoint); a ValueError that says why otherwise."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: choose cpu, cuda or cuda:N")
    if onnx and parsed.type != "cpu":
        raise ValueError(f"an ONNX model runs on the CPU (onnxruntime), not on {device}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) here; use cpu")
    return parsed


# Integer PCM (WAV, FLAC, ...) cannot hold NaN or infinity; float WAV and the lossy codecs' float output can.
_INTEGER_SUBTYPES = ("PCM_", "ULAW", "ALAW", "DWVW_", "DPCM_")


def check_samples(path: str) -> None:
    """Refuse what featurize's decode_audio refuses in the samples, with its reasons: NaN or infinite
    samples (a NaN makes every frame of its window NaN) and float samples beyond MAX_PEAK (their
    log-mel overflows). Read in blocks, so memory stays bounded, where decode_audio reads the whole file."""
    with soundfile.SoundFile(path) as audio:
        if audio.subtype.startswith(_INTEGER_SUBTYPES):
            return
        for block in audio.blocks(1 << 16, dtype="float32"):
            check_peak(block, path)


@dataclass
class Transcript:
    path: str
    text: str
    duration: float  # seconds
    words: list[Word] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "text": self.text, "duration": round(self.duration, 3),
                           "words": [{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(w).items()}
                                     for w in self.words]})


@dataclass
class _Window:
    file: int  # position of the file in the call
    start: float  # seconds into the file
    seconds: float  # its length
    own_from: float  # the stretch whose words this window keeps
    own_to: float
    waveform: torch.Tensor
    last: bool  # the file's last window


class Transcriber:
    """Load a checkpoint (.pt) or an exported model (.onnx) once, then `transcribe(paths)` as often as needed.

    decoder: "greedy", or "beam" with its settings in `beam` and the lexicon and LM in `lm_dir`
    (both unused by greedy decoding, so they may be None then).
    blank_penalty: subtracted from the blank log-probability before decoding.
    num_threads: onnxruntime's threads for a .onnx model (None: its default, every core); PyTorch's
    are the process's (torch.set_num_threads).
    """

    def __init__(self, checkpoint: str | Path, decoder: str, beam: BeamParams | None, lm_dir: str | Path | None,
                 blank_penalty: float, device: str, chunk_seconds: float, overlap_seconds: float, batch_size: int,
                 num_threads: int | None):
        if not 0 < 2 * overlap_seconds < chunk_seconds:
            raise ValueError(f"overlap_seconds ({overlap_seconds}) must be positive and under half of "
                             f"chunk_seconds ({chunk_seconds})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        onnx = Path(checkpoint).suffix == ".onnx"
        self.device = check_device(device, onnx)
        if onnx:
            self.model = OnnxModel(checkpoint, num_threads)
            state, self.tokenizer = self.model.settings, self.model.tokenizer
        else:
            state, model, self.tokenizer = load_model(checkpoint)
            self.model = model.to(self.device)
        self.config = LogMelConfig(**state["logmel"])
        self.logmel = LogMel(self.config).to(self.device)
        self.mean = torch.tensor(state["mean"], dtype=torch.float32, device=self.device)
        self.std = torch.tensor(state["std"], dtype=torch.float32, device=self.device)
        self.normalize = normalization(state)
        if decoder == "greedy":
            self.decode = GreedyDecoder(self.tokenizer, blank_penalty)
        elif decoder == "beam" and beam is not None and lm_dir is not None:
            self.decode = beam.decoder(self.tokenizer, lm_dir, blank_penalty)
        else:
            raise ValueError(f"decoder {decoder!r}: choose greedy, or beam with its settings and lm_dir")
        self.blank_penalty = blank_penalty
        self.chunk_seconds, self.overlap_seconds, self.batch_size = chunk_seconds, overlap_seconds, batch_size
        factor = subsampling_factor(self.model, self.config.n_mels, self.device)
        self.frame_seconds = factor * self.config.hop_length / self.config.sample_rate

    def transcribe(self, paths: Iterable[str | Path]) -> Iterator[Transcript]:
        """One Transcript per path, in order, each as soon as its last window is decoded."""
        paths = [str(p) for p in paths]
        for p in paths:
            read_info(p)  # fail on a missing or unreadable file before any work
            check_samples(p)
        done: dict[int, list[Word]] = {}
        words: dict[int, list[Word]] = {i: [] for i in range(len(paths))}
        next_out = 0
        batch: list[_Window] = []
        for window in self._windows(paths):
            batch.append(window)
            if len(batch) == self.batch_size or window.file == len(paths) - 1 and window.last:
                for w, found in zip(batch, self._decode(batch)):
                    words[w.file] += [x for x in found if w.own_from <= (x.start + x.end) / 2 < w.own_to]
                    if w.last:
                        done[w.file] = words.pop(w.file)
                batch = []
                while next_out in done:
                    found = done.pop(next_out)
                    yield Transcript(paths[next_out], " ".join(x.word for x in found),
                                     read_info(paths[next_out]).duration, found)
                    next_out += 1

    def _windows(self, paths: list[str]) -> Iterator[_Window]:
        for i, path in enumerate(paths):
            with soundfile.SoundFile(path) as audio:
                rate, total = audio.samplerate, audio.frames
                size, hop = round(self.chunk_seconds * rate), round((self.chunk_seconds - self.overlap_seconds) * rate)
                half = self.overlap_seconds / 2
                start = 0
                while True:
                    audio.seek(start)
                    samples = audio.read(size, dtype="float32", always_2d=True)
                    last = start + size >= total
                    t0 = start / rate
                    waveform = torch.from_numpy(samples.mean(axis=1))
                    if rate != self.config.sample_rate:
                        waveform = resample(waveform, rate, self.config.sample_rate)
                    yield _Window(i, t0, len(samples) / rate, 0.0 if start == 0 else t0 + half,
                                  float("inf") if last else t0 + self.chunk_seconds - half, waveform, last)
                    if last:
                        break
                    start += hop

    @torch.no_grad()
    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Normalized log-mel frames of a waveform at the model's sample rate, as featurize makes them
        and train and evaluate read them. A waveform shorter than one FFT (a tiny file) is padded
        with silence so it has a frame."""
        waveform = torch.nn.functional.pad(waveform, (0, max(0, self.config.n_fft - len(waveform))))
        return normalize_utterance((self.logmel(waveform.to(self.device)) - self.mean) / self.std, self.normalize)

    @torch.no_grad()
    def _decode(self, batch: list[_Window]) -> list[list[Word]]:
        feats = [self.features(w.waveform) for w in batch]
        lengths = torch.tensor([len(f) for f in feats], device=self.device)
        log_probs, out_lengths = self.model(torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths)
        log_probs, out_lengths = log_probs.cpu(), out_lengths.cpu()
        texts = self.decode(log_probs, out_lengths)
        found = []
        for w, scores, n, text in zip(batch, log_probs, out_lengths.tolist(), texts):
            aligned = align_words(scores[:n], text, self.tokenizer, self.frame_seconds, self.blank_penalty)
            # The last frame's span can reach past the audio's end by up to one frame.
            end = w.start + w.seconds
            found.append([replace(x, start=w.start + x.start, end=min(w.start + x.end, end)) for x in aligned])
        return found
