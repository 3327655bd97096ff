"""Audio at the edges of what the pipeline takes: odd sample rates, unscaled float samples, files
shorter than the analysis window, transcripts that look like numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from conftest import section
from ctcflow.audio import AudioError, decode_audio, resample
from ctcflow.data import SplitWriter, read_index
from stages import featurize


def sine_file(path, rate: int, seconds: float = 1.0, hz: float = 1000.0, amplitude: float = 0.5,
              subtype: str = "FLOAT") -> str:
    t = np.arange(round(seconds * rate)) / rate
    sf.write(path, amplitude * np.sin(2 * math.pi * hz * t), rate, subtype=subtype)
    return str(path)


def peak_hz(waveform: torch.Tensor, rate: int = 16000) -> float:
    spectrum = torch.fft.rfft(waveform).abs()
    return spectrum.argmax().item() * rate / waveform.numel()


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_common_rates_resample_exactly_as_torchaudio_does(rate):
    waveform = torch.randn(rate, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resample(waveform, rate, 16000), AF.resample(waveform, rate, 16000))


def test_a_rate_sharing_no_factor_with_16khz_resamples_through_a_near_fraction(tmp_path):
    # 16000/44101 has 7 × 10**8 kernel taps (12 GB to build); 1703/4694 has 8 × 10**6 and is
    # within 4 × 10**-8 of it.
    decoded = decode_audio(sine_file(tmp_path / "odd.wav", 44101), 16000)
    assert decoded.waveform.numel() == 16001  # ceil(44101 × 1703 / 4694)
    assert peak_hz(decoded.waveform) == pytest.approx(1000.0, abs=1.0)
    waveform = torch.randn(44101, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resample(waveform, 44101, 16000), AF.resample(waveform, 4694, 1703))


def test_float_samples_beyond_any_audio_scale_are_rejected(tmp_path):
    with pytest.raises(AudioError) as caught:
        decode_audio(sine_file(tmp_path / "huge.wav", 16000, amplitude=1e20), 16000)
    assert caught.value.reason == "implausible_amplitude"
    assert "1e+20" in caught.value.detail
    # Unscaled 32-bit integers stored as floats are still audio, and their log-mel stays finite.
    params = section("featurize", featurize.FeaturizeParams)
    loud = featurize.extract(sine_file(tmp_path / "int32.wav", 16000, amplitude=2.0**31), params, False, True)
    assert isinstance(loud, featurize.Extracted)
    assert np.isfinite(loud.frames).all() and np.isfinite(loud.sums[1]).all()


def test_audio_no_longer_than_the_window_is_rejected_not_crashed_on(tmp_path):
    params = section("featurize", featurize.FeaturizeParams, n_fft=8192, win_length=8192)
    short = featurize.extract(sine_file(tmp_path / "short.wav", 16000, seconds=0.25), params, False, False)
    assert isinstance(short, AudioError) and short.reason == "shorter_than_window"
    assert "4000 samples at 16000 Hz, not more than featurize.n_fft 8192" in short.detail
    long_enough = featurize.extract(sine_file(tmp_path / "long.wav", 16000, seconds=0.6), params, False, False)
    assert isinstance(long_enough, featurize.Extracted)


def test_transcripts_and_ids_of_digits_come_back_as_text(tmp_path):
    with SplitWriter(tmp_path / "train", dims=2, dtype=np.float16, shard_bytes=1000) as writer:
        writer.add({"id": "007", "speaker": "01", "duration": 0.1, "text_normalized": "01"}, np.zeros((3, 2)))
        writer.add({"id": "8", "speaker": "2", "duration": 0.1, "text_normalized": "7 1"}, np.zeros((3, 2)))
    index = read_index(tmp_path / "train")
    assert list(index["id"]) == ["007", "8"]
    assert list(index["speaker"]) == ["01", "2"]
    assert list(index["text_normalized"]) == ["01", "7 1"]
