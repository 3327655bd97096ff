"""Log-mel features: ctcflow's LogMel must give torchaudio MelSpectrogram's numbers."""

import pytest
import torch
import torchaudio.transforms as T

from ctcflow.features import LogMel, LogMelConfig


@pytest.mark.parametrize("config", [LogMelConfig(16000, 400, 400, 160, 80), LogMelConfig(8000, 256, 200, 80, 40),
                                    LogMelConfig(22050, 512, 512, 256, 64)])
def test_logmel_matches_torchaudio_melspectrogram(config):
    reference = T.MelSpectrogram(sample_rate=config.sample_rate, n_fft=config.n_fft, win_length=config.win_length,
                                 hop_length=config.hop_length, n_mels=config.n_mels)
    generator = torch.Generator().manual_seed(0)
    for num_samples in [config.n_fft // 2 + 1, config.sample_rate, 3 * config.sample_rate + 7]:
        waveform = 0.3 * torch.randn(num_samples, generator=generator)
        ours = LogMel(config)(waveform)
        theirs = reference(waveform).clamp_min(1e-10).log().T
        assert ours.shape == theirs.shape == (1 + num_samples // config.hop_length, config.n_mels)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_logmel_keeps_digital_silence_finite():
    frames = LogMel(LogMelConfig(16000, 400, 400, 160, 80))(torch.zeros(16000))
    assert torch.isfinite(frames).all()
    assert frames.max().item() == pytest.approx(torch.tensor(1e-10).log().item())
