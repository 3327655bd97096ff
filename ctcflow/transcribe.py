"""Transcribe audio files with a trained checkpoint (the `ctcflow transcribe MODEL AUDIO...` command).

Every file is read through before any is transcribed: one that cannot be decoded, or holds NaN,
infinite or implausibly large samples, is refused as featurize refuses it (AudioError); one that
featurize would reject as silent or flag as clipped is transcribed with a warning.

Files of any length and sample rate are read in fixed windows of `chunk_seconds` (so memory
does not grow with the file), consecutive windows overlapping by `overlap_seconds`. Features
are computed exactly as the featurize stage does (the checkpoint's log-mel settings, then the
training split's mean and std, then the checkpoint's per-utterance normalization, if any).
Windows from all files go through the model in batches.

Per-utterance normalization (featurize.normalize: utterance_mean, utterance_mean_var) uses the
statistics of each window: a file no longer than `chunk_seconds` is one window and is normalized
as evaluate normalizes a test utterance; a longer file is normalized window by window.

Words at window borders (merge_words): the border between two windows is the middle of their
overlap. The earlier window keeps its words whose aligned midpoint lies before the border; the
later one keeps its words whose midpoint lies at or after the end of the last word kept so far.
Two windows align a word near the border a little differently, so a test of both against the
border alone can make each leave the word to the other; this way a word the earlier window left
is taken by the later one, and a word it kept is not taken again.

Word times come from the CTC alignment: output frame × model time stride × hop / sample rate.

MODEL is a checkpoint (.pt), run by PyTorch, or a file `ctcflow export` wrote (.onnx), run by
onnxruntime on the CPU: the same features (from the file's metadata), decoders and word timings.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import soundfile
import torch

from ctcflow.audio import FULL_SCALE, AudioError, check_peak, read_info, resample, silence
from ctcflow.checkpoint import CheckpointError, load_model
from ctcflow.data import normalization, normalize_utterance
from ctcflow.decoding import BeamParams, GreedyDecoder, Word, align_words
from ctcflow.errors import CtcflowError
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


@dataclass(frozen=True)
class Level:
    peak: float  # the largest |sample|
    clipped_fraction: float  # share of samples at full scale (audio.FULL_SCALE), before down-mixing


# libsndfile's decoders raise RuntimeError subclasses (LibsndfileError: "flac decoder lost sync"
# for a cut FLAC file, say); the file system, OSError.
_READ_ERRORS = (RuntimeError, OSError)


def check_samples(path: str) -> Level:
    """Decode every sample, in blocks so memory stays bounded (decode_audio reads the whole file),
    and refuse what featurize's decode_audio refuses, with its reasons: a file that fails to decode
    (unreadable_audio: integer PCM such as FLAC can be cut short or damaged), NaN or infinite
    samples (a NaN makes every frame of its window NaN) and samples beyond MAX_PEAK (their log-mel
    overflows). Returns what featurize's silence and clipping checks look at."""
    peak, clipped, total = 0.0, 0, 0
    try:
        with soundfile.SoundFile(path) as audio:
            for block in audio.blocks(1 << 16, dtype="float32", always_2d=True):
                block_peak = check_peak(block, path)
                if block_peak >= FULL_SCALE:  # counted as decode_audio counts them
                    clipped += int(np.count_nonzero(np.abs(block) >= FULL_SCALE))
                peak, total = max(peak, block_peak), total + block.size
    except _READ_ERRORS as err:
        raise AudioError("unreadable_audio", f"{path}: {err}") from None
    return Level(peak, clipped / max(total, 1))


def level_warning(path: str, level: Level, silence_db: float | None, clip_warn_fraction: float) -> str | None:
    """One line on what featurize would reject (silent_audio) or flag (clipped_audio) in a file, and
    on float samples not scaled to ±1 (the model never heard such levels); None when all is well."""
    if why := silence(level.peak, silence_db):
        return f"{path}: silent ({why}; featurize rejects such a file as silent_audio): its transcript is noise"
    problems = []
    if level.peak > 1.0:
        problems.append(f"peak sample {level.peak:.3g} is above 1.0 (float samples not scaled to -1…1?)")
    if level.clipped_fraction >= clip_warn_fraction:
        problems.append(f"{level.clipped_fraction:.2%} of samples at full scale (clipped_audio)")
    return f"{path}: {'; '.join(problems)}: transcribed, but expect errors" if problems else None


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def merge_words(kept: list[Word], found: list[Word], border: float) -> list[Word]:
    """Which words of a file's next window (`found`) to add to those kept from its earlier windows:
    those whose midpoint lies at or after the end of the last word kept so far (a word an earlier
    window kept ends there or before, so it is not kept twice; one it left is taken however this
    window aligns it) and before `border`, the middle of this window's overlap with the next (inf
    for a file's last window)."""
    after = kept[-1].end if kept else -math.inf
    return [w for w in found if after <= (w.start + w.end) / 2 < border]


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
    border: float  # the middle of its overlap with the next window; inf for the file's last
    waveform: torch.Tensor
    last: bool  # the file's last window


def beam_decoder(beam: BeamParams, tokenizer, lm_dir: Path, blank_penalty: float):
    """beam.decoder, with the RuntimeError flashlight (lexicon) or KenLM (LM) raises on a damaged or
    empty file, which names neither file and spans lines, turned into one line naming it."""
    try:
        return beam.decoder(tokenizer, lm_dir, blank_penalty)
    except RuntimeError as err:
        # flashlight reads the lexicon first ("[loadWords] Invalid line: ..."), KenLM the LM after it.
        if beam.lexicon and ("loadWords" in str(err) or beam.lm_weight == 0):
            bad, what = lm_dir / "lexicon.txt", "a lexicon"
        elif beam.lm_weight > 0:
            bad, what = lm_dir / "lm.arpa", "an ARPA language model KenLM can read"
        else:
            raise
        lines = str(err).strip().splitlines()
        reason = lines[-1] if lines else type(err).__name__  # KenLM's last line says what is wrong
        raise CtcflowError(f"{bad}: not {what} ({reason}); rebuild it with the lm stage") from None


class Transcriber:
    """Load a checkpoint (.pt) or an exported model (.onnx) once, then `transcribe(paths)` as often as needed.

    decoder: "greedy", or "beam" with its settings in `beam` and the lexicon and LM in `lm_dir`
    (both unused by greedy decoding, so they may be None then).
    blank_penalty: subtracted from the blank log-probability before decoding.
    num_threads: onnxruntime's threads for a .onnx model (None: its default, every core); PyTorch's
    are the process's (torch.set_num_threads).
    silence_db, clip_warn_fraction: featurize's settings of the same names (params.yaml's values by
    default), for the warnings on silent and clipped files.
    """

    def __init__(self, checkpoint: str | Path, decoder: str, beam: BeamParams | None, lm_dir: str | Path | None,
                 blank_penalty: float, device: str, chunk_seconds: float, overlap_seconds: float, batch_size: int,
                 num_threads: int | None, *, silence_db: float | None = -60.0, clip_warn_fraction: float = 0.001):
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
        try:  # a damaged or hand-made checkpoint: one line naming it, not a TypeError deep in torch
            self.config = LogMelConfig(**state["logmel"])
            self.mean = torch.tensor(state["mean"], dtype=torch.float32, device=self.device)
            self.std = torch.tensor(state["std"], dtype=torch.float32, device=self.device)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{checkpoint}: its feature settings do not load ({type(err).__name__}: {err})") from None
        self.logmel = LogMel(self.config).to(self.device)
        self.normalize = normalization(state)
        if decoder == "greedy":
            self.decode = GreedyDecoder(self.tokenizer, blank_penalty)
        elif decoder == "beam" and beam is not None and lm_dir is not None:
            self.decode = beam_decoder(beam, self.tokenizer, Path(lm_dir), blank_penalty)
        else:
            raise ValueError(f"decoder {decoder!r}: choose greedy, or beam with its settings and lm_dir")
        self.blank_penalty = blank_penalty
        self.silence_db, self.clip_warn_fraction = silence_db, clip_warn_fraction
        self.chunk_seconds, self.overlap_seconds, self.batch_size = chunk_seconds, overlap_seconds, batch_size
        factor = subsampling_factor(self.model, self.config.n_mels, self.device)
        self.frame_seconds = factor * self.config.hop_length / self.config.sample_rate

    def transcribe(self, paths: Iterable[str | Path],
                   warn: Callable[[str], None] = print_warning) -> Iterator[Transcript]:
        """One Transcript per path, in order, each as soon as its last window is decoded. Every file
        is read through first: a bad one is an AudioError before any work, and `warn` gets one line
        for each file featurize would reject as silent or flag as clipped."""
        paths = [str(p) for p in paths]
        for p in paths:
            read_info(p)  # fail on a missing or unreadable file before any work
            problem = level_warning(p, check_samples(p), self.silence_db, self.clip_warn_fraction)
            if problem:
                warn(problem)
        done: dict[int, list[Word]] = {}
        words: dict[int, list[Word]] = {i: [] for i in range(len(paths))}
        next_out = 0
        batch: list[_Window] = []
        for window in self._windows(paths):
            batch.append(window)
            if len(batch) == self.batch_size or window.file == len(paths) - 1 and window.last:
                for w, found in zip(batch, self._decode(batch)):  # a file's windows come in order
                    words[w.file] += merge_words(words[w.file], found, w.border)
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
            try:
                audio = soundfile.SoundFile(path)
            except _READ_ERRORS as err:  # changed since it was checked
                raise AudioError("unreadable_audio", f"{path}: {err}") from None
            with audio:
                rate, total = audio.samplerate, audio.frames
                size, hop = round(self.chunk_seconds * rate), round((self.chunk_seconds - self.overlap_seconds) * rate)
                start = 0
                while True:
                    try:
                        audio.seek(start)
                        samples = audio.read(size, dtype="float32", always_2d=True)
                    except _READ_ERRORS as err:
                        raise AudioError("unreadable_audio", f"{path}: {err}") from None
                    last = start + size >= total
                    t0 = start / rate
                    waveform = torch.from_numpy(samples.mean(axis=1))
                    if rate != self.config.sample_rate:
                        waveform = resample(waveform, rate, self.config.sample_rate)
                    yield _Window(i, t0, len(samples) / rate,
                                  math.inf if last else t0 + self.chunk_seconds - self.overlap_seconds / 2, waveform,
                                  last)
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
