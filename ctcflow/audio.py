"""Audio I/O with soundfile (libsndfile: WAV/FLAC/OGG/MP3) and torchaudio resampling.

Every failure becomes an `AudioError` whose `reason` is a short stable code, so the
manifest stage can count rejects by reason instead of crashing on one bad file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from ctcflow.manifest import Rejected


class AudioError(Rejected):
    """Audio that cannot be read or used."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    num_frames: int
    num_channels: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.sample_rate


def read_info(path: str | Path) -> AudioInfo:
    """Header only: cheap enough to run over a whole corpus."""
    path = Path(path)
    if not path.is_file():
        raise AudioError("missing_file", f"{path} does not exist")
    if path.stat().st_size == 0:
        raise AudioError("empty_file", f"{path} has zero bytes")
    try:
        info = soundfile.info(str(path))
    except Exception as err:  # libsndfile raises several types for unreadable input
        raise AudioError("unreadable_audio", f"{path}: {err}") from err
    if info.frames <= 0:
        raise AudioError("no_samples", f"{path} holds no audio samples")
    return AudioInfo(info.samplerate, info.frames, info.channels)


def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform at `sample_rate`: channels averaged, resampled if needed."""
    try:
        samples, source_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError("unreadable_audio", f"{path}: {err}") from err
    if samples.size == 0:
        raise AudioError("no_samples", f"{path} holds no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError("non_finite_samples", f"{path} contains NaN or infinite samples")
    waveform = torch.from_numpy(samples.mean(axis=1))
    if source_rate != sample_rate:
        waveform = AF.resample(waveform, source_rate, sample_rate)
    return waveform
