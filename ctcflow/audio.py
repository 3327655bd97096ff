"""Audio I/O with soundfile (libsndfile: WAV/FLAC/OGG/MP3) and torchaudio resampling.

Every failure becomes an `AudioError` whose `reason` is a short stable code, so the
manifest stage can count rejects by reason instead of crashing on one bad file.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from ctcflow.errors import Rejected


class AudioError(Rejected):
    """Audio that cannot be read or used."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int | float  # Hz; frames per second for a precomputed feature array
    num_frames: int
    num_channels: int  # dimensions per frame for a precomputed feature array

    @property
    def duration(self) -> float:
        return self.num_frames / self.sample_rate


def check_file(path: str | Path, error: type[Rejected]) -> None:
    """Reject a path that is no regular file, or an empty one, saying which. Called before a file
    is opened, since only a regular file is safe to read: a FIFO blocks the read forever, a
    device never ends; a name the file system refuses (too long, say) is missing."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise error("missing_file", f"{path} does not exist or is not a file") from None
    except OSError as err:
        raise error("missing_file", f"{path}: {err.strerror}") from None
    if stat.S_ISDIR(status.st_mode):
        raise error("missing_file", f"{path} is a directory")
    if not stat.S_ISREG(status.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(status.st_mode) else "a socket" if stat.S_ISSOCK(status.st_mode) else "a device"
        raise error("not_a_regular_file", f"{path} is {kind}, not a regular file")
    if status.st_size == 0:
        raise error("empty_file", f"{path} has zero bytes")


# Below this a header's rate is a mistake (a corrupt or hand-written header), not speech: telephone audio is 8 kHz.
MIN_SAMPLE_RATE = 1000


def check_sample_rate(sample_rate: float, path: str | Path) -> None:
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioError("implausible_sample_rate", f"{path}: the header says {sample_rate} Hz (< {MIN_SAMPLE_RATE} Hz)")


def read_info(path: str | Path) -> AudioInfo:
    """Header only: cheap enough to run over a whole corpus.

    Opens the file with soundfile.SoundFile (≈1.5× faster than soundfile.info, which also reads
    the format's extra info); the file system is asked why only when the open fails.
    """
    try:
        with soundfile.SoundFile(str(path)) as f:
            info = AudioInfo(f.samplerate, f.frames, f.channels)
    except Exception as err:  # libsndfile raises several types for unreadable input
        path = Path(path)
        check_file(path, AudioError)
        raise AudioError("unreadable_audio", f"{path}: {err}") from None
    if info.num_frames <= 0:
        raise AudioError("no_samples", f"{path} holds no audio samples")
    check_sample_rate(info.sample_rate, path)
    return info


@dataclass(frozen=True)
class Decoded:
    waveform: torch.Tensor  # mono float32 at the requested rate
    clipped_fraction: float  # share of samples at full scale, before down-mixing


FULL_SCALE = 0.999  # 16-bit full scale reads as 32767/32768 ≈ 0.99997
# A float file may hold unscaled integer samples (up to 2**31), never more: larger numbers are no
# audio, and their squares overflow float32 in the log-mel (inf frames that poison the statistics).
MAX_PEAK = 2.0**31
# torchaudio's resampling kernel has (target rate ÷ gcd) × (source rate ÷ gcd) taps: 70,560 for
# 44,100 → 16,000 Hz, but 7 × 10**8 (12 GB while it is built) for 44,101 Hz. Above this many the
# ratio is rounded to the nearest fraction within it: pitch and speed move by at most 0.013 %
# (16,003 Hz, of every rate from 1 to 400 kHz to 16 kHz), where speed perturbation moves 10 %.
MAX_RESAMPLE_TAPS = 10**7


def resample(waveform: torch.Tensor, source_rate: int, target_rate: int) -> torch.Tensor:
    ratio = Fraction(int(target_rate), int(source_rate))
    if ratio.numerator * ratio.denominator > MAX_RESAMPLE_TAPS:
        # numerator × denominator ≈ ratio × denominator²
        ratio = ratio.limit_denominator(int(math.sqrt(MAX_RESAMPLE_TAPS / ratio)))
    return AF.resample(waveform, ratio.denominator, ratio.numerator)


def check_peak(samples: np.ndarray, path: str | Path) -> float:
    """The peak of these samples; NaN, infinite or beyond MAX_PEAK is an AudioError."""
    # Two reductions and no temporary arrays: a NaN makes both NaN, and an infinity one of them.
    low, high = float(samples.min()), float(samples.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise AudioError("non_finite_samples", f"{path} contains NaN or infinite samples")
    peak = max(high, -low)
    if peak > MAX_PEAK:
        raise AudioError("implausible_amplitude", f"{path}: peak sample {peak:.3g} is beyond any audio scale (> 2**31)")
    return peak


def silence(peak: float, silence_db: float | None) -> str | None:
    """Why audio with this peak is silent_audio ("peak … <= silence_db …"); None if it is not, or
    when silence_db is None (no check)."""
    if silence_db is None or peak > 10 ** (silence_db / 20):
        return None
    level = f"{20 * np.log10(peak):.1f} dBFS" if peak > 0 else "digital silence"
    return f"peak {level} <= silence_db {silence_db}"


def decode_audio(path: str | Path, sample_rate: int, silence_db: float | None = None) -> Decoded:
    """Read all samples: reject NaN/inf and (if silence_db is set) audio whose peak stays below it.

    Channels are averaged and the result resampled to `sample_rate` with torchaudio.
    """
    try:
        samples, source_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError("unreadable_audio", f"{path}: {err}") from err
    if samples.size == 0:
        raise AudioError("no_samples", f"{path} holds no audio samples")
    check_sample_rate(source_rate, path)
    peak = check_peak(samples, path)
    if why := silence(peak, silence_db):
        raise AudioError("silent_audio", f"{path}: {why}")
    # Counted only when some sample reaches full scale.
    clipped = float(np.count_nonzero(np.abs(samples) >= FULL_SCALE) / samples.size) if peak >= FULL_SCALE else 0.0
    # One channel is used as it is (a view): its mean over channels is the same numbers, copied.
    waveform = torch.from_numpy(samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1))
    if source_rate != sample_rate:
        waveform = resample(waveform, source_rate, sample_rate)
    return Decoded(waveform, clipped)
