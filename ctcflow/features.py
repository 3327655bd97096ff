"""Log-mel features, precomputed feature arrays, normalization statistics and SpecAugment.

Log-mel and SpecAugment come from torchaudio. A precomputed feature array (for example
per-frame features of sign-language video) is a `.npy` file of shape frames × dims.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
import torchaudio.transforms as T

from ctcflow.audio import AudioInfo, check_file
from ctcflow.errors import Rejected

FEATURE_SUFFIX = ".npy"


def is_feature_file(path: str | Path) -> bool:
    return str(path).lower().endswith(FEATURE_SUFFIX)


def _open_array(path: str | Path, mmap: bool) -> np.ndarray:
    path = Path(path)
    check_file(path, Rejected)
    try:  # allow_pickle stays off: a feature file is data, never code to run
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as err:
        raise Rejected("unreadable_features", f"{path}: {err}") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number) or array.shape[1] == 0:
        raise Rejected("bad_feature_shape", f"{path}: need a numeric frames × dims array, got {array.dtype} {array.shape}")
    if array.shape[0] == 0:
        raise Rejected("no_samples", f"{path} holds no frames")
    return array


def read_feature_header(path: str | Path, frame_rate: float) -> AudioInfo:
    """Shape only (the array is memory-mapped, not read): frames and dims, at `frame_rate` frames/s."""
    array = _open_array(path, mmap=True)
    return AudioInfo(frame_rate, array.shape[0], array.shape[1])


def load_feature_array(path: str | Path) -> np.ndarray:
    """The whole array as float32; NaN or infinite values are a reject."""
    array = _open_array(path, mmap=False).astype(np.float32)
    if not np.isfinite(array).all():
        raise Rejected("non_finite_values", f"{path} contains NaN or infinite values")
    return array


@dataclass(frozen=True)
class LogMelConfig:
    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int

    def to_dict(self) -> dict:
        return asdict(self)


def mel_filters(config: LogMelConfig) -> torch.Tensor:
    """torchaudio's HTK mel filters, (n_fft // 2 + 1, n_mels); torchaudio warns of any that is all zeros."""
    return AF.melscale_fbanks(config.n_fft // 2 + 1, 0.0, config.sample_rate / 2, config.n_mels, config.sample_rate)


class LogMel(torch.nn.Module):
    """Waveform (samples,) → log-mel frames (frames, n_mels), the same numbers to float rounding as
    torchaudio's MelSpectrogram with its defaults (power 2, Hann window, centred reflect-padded
    frames, HTK mel filters), then log.

    Written out as torch.stft and torchaudio's mel filters because MelSpectrogram takes |z| (a square
    root) and squares it back and goes through three modules per call: that made it the costliest
    step of featurize, and this is 1.4× faster (benchmarks/featurize.py). A test holds it to
    MelSpectrogram.
    """

    def __init__(self, config: LogMelConfig):
        super().__init__()
        self.n_fft, self.hop_length, self.win_length = config.n_fft, config.hop_length, config.win_length
        self.register_buffer("window", torch.hann_window(config.win_length), persistent=False)
        self.register_buffer("filters", mel_filters(config), persistent=False)

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(waveform, self.n_fft, self.hop_length, self.win_length, self.window,
                              center=True, pad_mode="reflect", return_complex=True)
        power = spectrum.real.square() + spectrum.imag.square()  # (freqs, frames)
        # The floor keeps digital silence finite instead of log(0) = -inf.
        return (power.T @ self.filters).clamp_min(1e-10).log()


class RunningStats:
    """Per-bin mean and standard deviation over all frames of a split, in float64."""

    def __init__(self, n_bins: int):
        self.count = 0
        self.sum = np.zeros(n_bins)
        self.sum_sq = np.zeros(n_bins)

    @staticmethod
    def frame_sums(frames: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """One utterance's share: frames, per-bin sum and sum of squares in float64."""
        frames = frames.astype(np.float64)
        return len(frames), frames.sum(axis=0), (frames**2).sum(axis=0)

    def add(self, sums: tuple[int, np.ndarray, np.ndarray]) -> None:
        count, total, total_sq = sums
        self.count += count
        self.sum += total
        self.sum_sq += total_sq

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("no frames to compute statistics from")
        mean = self.sum / self.count
        var = np.maximum(self.sum_sq / self.count - mean**2, 1e-8)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def spec_augment(
    n_freq_masks: int, freq_mask: int, n_time_masks: int, time_mask: int, max_time_fraction: float
) -> T.SpecAugment:
    """Masks on normalized features, so the fill value 0 is the corpus mean."""
    return T.SpecAugment(
        n_time_masks=n_time_masks,
        time_mask_param=time_mask,
        n_freq_masks=n_freq_masks,
        freq_mask_param=freq_mask,
        iid_masks=True,
        p=max_time_fraction,
        zero_masking=True,
    )
