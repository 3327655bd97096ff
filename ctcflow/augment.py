"""Waveform augmentation: speed, pitch, reverberation, additive noise, channel and gain.

Every function takes a mono float32 waveform (samples,) and its sample rate; every random draw
comes from the `torch.Generator` passed in, so a result is a pure function of the input, the
generator's seed and the settings. Nothing here is tied to a corpus: babble noise is mixed from
utterances the caller passes in.

`augment` applies the chain in the order sound takes: the speaker (speed, pitch), the room
(reverberation, background noise), then the channel (microphone or telephone band, EQ) and the
recording level (gain). Output samples are not clipped: features are computed from floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Annotated

import torch
import torchaudio.functional as AF
from pydantic import AfterValidator

from ctcflow.params import Float, Int

# Resampling ratios are rounded to fractions with a denominator up to this: 0.9 and 1.1 stay
# exact, any other ratio moves by at most 0.5 % (0.09 semitone), and torchaudio's kernel, as long
# as the ratio's numerator, stays short (16467/16000 makes resample 40 000 times slower than 11/10).
MAX_RATIO_DENOMINATOR = 100

NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectral density ∝ 1/f^exponent
NOISE_KINDS = (*NOISE_EXPONENTS, "babble")
# Rooms and microphones carry next to nothing below this; without the floor, brown noise would put
# most of its power in infrasound, out of the speech band, and its SNR would say nothing.
NOISE_FLOOR_HZ = 20.0

BUTTERWORTH_ORDER = 8  # per cut-off: 48 dB per octave, the steepness of a codec's or a telephone's band filter
TELEPHONE_BAND_HZ = (300.0, 3400.0)
TELEPHONE_RATE = 8000
EQ_Q = 1.0  # a peak about 1.4 octaves wide: the broad colouring of a cheap microphone or a small room

PITCH_WINDOW_S = 0.032  # phase-vocoder STFT window (512 samples at 16 kHz)


# ----------------------------------------------------------------------------- settings


# Each setting's bounds (low, high, why): outside them an effect fails or writes NaN frames.
BOUNDS = {
    "factors": (0.5, 2.0, "half to twice the speed"), "semitones": (-12, 12, "an octave either way"),
    "rt60": (0.01, 10, "seconds"), "drr_db": (-60, 60, "dB"), "snr_db": (-60, 120, "dB"),
    "babble_speakers": (1, 100, "other utterances"), "low_cut_hz": (0, 1e6, "Hz"), "high_cut_hz": (1, 1e6, "Hz"),
    "eq_bands": (0, 32, "peaking filters"), "eq_hz": (1, 1e6, "Hz"), "eq_gain_db": (-40, 40, "dB"),
    "gain_db": (-60, 60, "dB"),
}


def check_setting(name: str, value):
    """One setting's checks: probabilities in [0, 1], (low, high) ranges in order and inside BOUNDS.

    Run on every field by the dataclasses below when the params are read (pydantic reports it under
    the effect's key), so a bad value fails then, not halfway through featurize."""
    if name.endswith("prob") and not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    if name == "factors" and not value:
        raise ValueError("factors must list at least one speed factor, e.g. [0.9, 1.0, 1.1]")
    if name == "kinds" and (not value or set(value) - set(NOISE_KINDS)):
        raise ValueError(f"noise kinds must be some of {list(NOISE_KINDS)}, got {list(value)}")
    if isinstance(value, tuple) and len(value) == 2 and name not in ("factors", "kinds") and value[0] > value[1]:
        raise ValueError(f"{name} is a (low, high) range, got {list(value)}")
    if name in BOUNDS:
        check_within(name, value, *BOUNDS[name])
    return value


def check_settings(config) -> None:
    for name, value in vars(config).items():
        check_setting(name, value)


def Checked(name: str, kind):
    """`kind` with check_setting(name) run by pydantic on the field alone, so that its error names
    the field's own key (featurize.augment.gain_db) and shows only its value."""
    return Annotated[kind, AfterValidator(partial(check_setting, name))]


def check_within(name: str, values, low: float, high: float, why: str) -> None:
    """Every value of a setting inside [low, high]: outside, an effect fails or writes NaN frames."""
    values = values if isinstance(values, tuple) else (values,)
    if not all(low <= v <= high for v in values):  # NaN fails every comparison
        raise ValueError(f"{name} must lie within [{low:g}, {high:g}] ({why}), got {list(values)}")


@dataclass(frozen=True)
class SpeedConfig:
    enabled: bool
    factors: tuple[Float, ...]  # one drawn per utterance; 1.1 is 10 % faster (shorter, higher)

    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class PitchConfig:
    prob: Float
    semitones: tuple[Float, Float]  # uniform range

    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class ReverbConfig:
    prob: Float
    rt60: tuple[Float, Float]  # seconds for the reverberant tail to fall by 60 dB
    drr_db: tuple[Float, Float]  # direct-to-reverberant energy ratio: high is close to the microphone

    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class NoiseConfig:
    prob: Float
    snr_db: tuple[Float, Float]
    kinds: tuple[str, ...]  # drawn uniformly among white, pink, brown, babble
    babble_speakers: tuple[Int, Int]  # how many other utterances make one babble, inclusive range

    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class ChannelConfig:
    prob: Float
    telephone_prob: Float  # share of channels that are a telephone band; the rest get a random band
    telephone_8khz: bool  # telephone audio goes through 8 kHz and back
    low_cut_hz: tuple[Float, Float]  # random band: high-pass cut-off range (0 keeps the lows)
    high_cut_hz: tuple[Float, Float]  # random band: low-pass cut-off range (at Nyquist or above keeps the highs)
    eq_bands: Int  # peaking filters after the band, each at a log-uniform frequency
    eq_hz: tuple[Float, Float]
    eq_gain_db: tuple[Float, Float]

    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class AugmentConfig:
    speed: SpeedConfig
    pitch: PitchConfig
    reverb: ReverbConfig
    noise: NoiseConfig
    channel: ChannelConfig
    gain_db: tuple[Float, Float]

    def __post_init__(self):
        check_settings(self)

    @classmethod
    def from_dict(cls, params: dict) -> AugmentConfig:
        """From a params-style mapping: one mapping per effect, lists for ranges."""

        def section(values: dict) -> dict:
            return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}

        return cls(speed=SpeedConfig(**section(params["speed"])), pitch=PitchConfig(**section(params["pitch"])),
                   reverb=ReverbConfig(**section(params["reverb"])), noise=NoiseConfig(**section(params["noise"])),
                   channel=ChannelConfig(**section(params["channel"])), gain_db=tuple(params["gain_db"]))


# ----------------------------------------------------------------------------- the speaker


def _ratio(value: float) -> Fraction:
    return Fraction(value).limit_denominator(MAX_RATIO_DENOMINATOR)


def speed(waveform: torch.Tensor, factor: float) -> torch.Tensor:
    """Kaldi-style speed perturbation: resampled, so length ÷ factor and pitch × factor together."""
    ratio = _ratio(factor)
    # Read as if recorded at rate × factor and resampled to the rate: the rate itself cancels out.
    return AF.resample(waveform, ratio.numerator, ratio.denominator)


def pitch_shift(waveform: torch.Tensor, sample_rate: int, semitones: float) -> torch.Tensor:
    """Pitch and formants moved by `semitones`, duration kept: resample, then phase-vocoder stretch.

    Why this for new speakers: resampling scales pitch and formants together as a shorter or longer
    vocal tract does (what VTLP's warp imitates on features), on the waveform, in two library calls.
    torchaudio's own pitch_shift does the same but truncates the ratio to an integer rate, whose
    resampling kernel can be thousands of times slower.
    """
    num_samples = waveform.numel()
    ratio = _ratio(2.0 ** (semitones / 12))
    shifted = speed(waveform, float(ratio))
    n_fft = 2 ** round(math.log2(PITCH_WINDOW_S * sample_rate))
    # The centred STFT pads n_fft // 2 samples by reflection, which needs more samples than that: a
    # clip shorter than half the window (a few ms, as a sped-up copy of one can be) gets a shorter one.
    while n_fft > 4 and shifted.numel() <= n_fft // 2:
        n_fft //= 2
    if shifted.numel() <= n_fft // 2:
        return waveform  # two samples or fewer: no pitch to move
    hop = n_fft // 4
    window = torch.hann_window(n_fft)
    spectrum = torch.stft(shifted, n_fft, hop, window=window, return_complex=True)
    phase_advance = torch.linspace(0, math.pi * hop, spectrum.shape[0])[:, None]
    stretched = AF.phase_vocoder(spectrum, float(1 / ratio), phase_advance)
    return torch.istft(stretched, n_fft, hop, window=window, length=num_samples)


# ----------------------------------------------------------------------------- the room


def room_impulse_response(sample_rate: int, rt60: float, drr_db: float, generator: torch.Generator) -> torch.Tensor:
    """A direct-path impulse followed by Gaussian noise whose energy falls 60 dB in `rt60` seconds."""
    length = max(2, math.ceil(rt60 * sample_rate))
    time = torch.arange(1, length) / sample_rate
    tail = torch.randn(length - 1, generator=generator) * torch.exp(-3 * math.log(10) * time / rt60)
    tail *= 10 ** (-drr_db / 20) / tail.norm()  # direct path has energy 1
    return torch.cat([torch.ones(1), tail])


def reverberate(waveform: torch.Tensor, sample_rate: int, rt60: float, drr_db: float,
                generator: torch.Generator) -> torch.Tensor:
    """Convolved with a simulated room; same length (the tail past the end is cut) and same RMS."""
    response = room_impulse_response(sample_rate, rt60, drr_db, generator)
    # Zeros after the response change no output sample and make the FFT a power of two.
    padding = _fft_size(waveform.numel() + response.numel() - 1) - waveform.numel() + 1 - response.numel()
    wet = AF.fftconvolve(waveform, torch.nn.functional.pad(response, (0, padding)))[: waveform.numel()]
    return _match_rms(wet, waveform)


def _fft_size(num_samples: int) -> int:
    """The power of two from `num_samples` up: an FFT of awkward (say prime) length is 4-10x slower."""
    return 1 << (num_samples - 1).bit_length()


def _match_rms(waveform: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    power = waveform.square().mean()
    return waveform * (reference.square().mean() / power).sqrt() if power > 0 else waveform


def colored_noise(num_samples: int, sample_rate: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """White, pink (1/f) or brown (1/f²) Gaussian noise, shaped in the frequency domain, unit RMS.

    Made at a power-of-two length and cut: a stretch of stationary noise has the same spectrum.
    """
    size = _fft_size(num_samples)
    spectrum = torch.fft.rfft(torch.randn(size, generator=generator))
    frequencies = torch.fft.rfftfreq(size, 1 / sample_rate)
    amplitude = frequencies.clamp_min(NOISE_FLOOR_HZ) ** (-NOISE_EXPONENTS[kind] / 2)  # clamped: no 0 ** -1
    noise = torch.fft.irfft(spectrum * torch.where(frequencies < NOISE_FLOOR_HZ, 0.0, amplitude), size)
    return _match_rms(noise[:num_samples], torch.ones(1))


def babble(num_samples: int, others: Sequence[torch.Tensor], speakers: int, generator: torch.Generator) -> torch.Tensor:
    """`speakers` utterances drawn from `others` (with replacement), each looped from a random
    offset to `num_samples` and brought to unit RMS, summed."""
    if not others:
        raise ValueError("babble noise needs other utterances to mix; none were given")
    mix = torch.zeros(num_samples)
    for index in torch.randint(len(others), (speakers,), generator=generator).tolist():
        talker = others[index]
        offset = int(torch.randint(talker.numel(), (), generator=generator))
        looped = talker.roll(-offset).repeat(math.ceil(num_samples / talker.numel()))[:num_samples]
        mix += _match_rms(looped, torch.ones(1))
    return mix


def add_noise(waveform: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """`noise` scaled to 10·log10(P_signal / P_noise) = snr_db over the whole utterance, added."""
    noise_power = noise.square().mean()
    if noise_power == 0:  # silent babble sources: nothing to add (and no division by zero)
        return waveform
    return waveform + noise * (waveform.square().mean() / (noise_power * 10 ** (snr_db / 10))).sqrt()


# ----------------------------------------------------------------------------- the channel


def _biquad(waveform: torch.Tensor, b: list[float], a: list[float]) -> torch.Tensor:
    # float64: low cut-offs put the poles close to the unit circle; no clamping to [-1, 1] either
    filtered = AF.lfilter(waveform.double(), torch.tensor(a, dtype=torch.float64),
                          torch.tensor(b, dtype=torch.float64), clamp=False)
    return filtered.to(waveform.dtype)


def _butterworth(waveform: torch.Tensor, sample_rate: int, cutoff_hz: float, highpass: bool) -> torch.Tensor:
    """Digital Butterworth as a cascade of RBJ-cookbook biquads sharing the cut-off."""
    w0 = 2 * math.pi * cutoff_hz / sample_rate
    cos_w0 = math.cos(w0)
    for section in range(BUTTERWORTH_ORDER // 2):
        q = 1 / (2 * math.cos((2 * section + 1) * math.pi / (2 * BUTTERWORTH_ORDER)))
        alpha = math.sin(w0) / (2 * q)
        edge = (1 + cos_w0) / 2 if highpass else (1 - cos_w0) / 2
        b = [edge, -2 * edge, edge] if highpass else [edge, 2 * edge, edge]
        waveform = _biquad(waveform, b, [1 + alpha, -2 * cos_w0, 1 - alpha])
    return waveform


def band_limit(waveform: torch.Tensor, sample_rate: int, low_hz: float, high_hz: float) -> torch.Tensor:
    """Below `low_hz` and above `high_hz` removed (48 dB/octave); a cut-off of 0 or at Nyquist is none."""
    if low_hz > 0:
        waveform = _butterworth(waveform, sample_rate, low_hz, highpass=True)
    if high_hz < sample_rate / 2:
        waveform = _butterworth(waveform, sample_rate, high_hz, highpass=False)
    return waveform


def telephone(waveform: torch.Tensor, sample_rate: int, through_8khz: bool) -> torch.Tensor:
    """The 300–3400 Hz telephone band, optionally carried at 8 kHz and brought back to the rate."""
    banded = band_limit(waveform, sample_rate, *TELEPHONE_BAND_HZ)
    if not through_8khz or sample_rate <= TELEPHONE_RATE:
        return banded
    narrow = AF.resample(banded, sample_rate, TELEPHONE_RATE)
    return AF.resample(narrow, TELEPHONE_RATE, sample_rate)[: waveform.numel()]


def equalize(waveform: torch.Tensor, sample_rate: int, peaks: Sequence[tuple[float, float]]) -> torch.Tensor:
    """Peaking filters (RBJ cookbook), one per (centre Hz, gain dB)."""
    for centre_hz, gain_db in peaks:
        w0 = 2 * math.pi * centre_hz / sample_rate
        alpha, amplitude = math.sin(w0) / (2 * EQ_Q), 10 ** (gain_db / 40)
        b = [1 + alpha * amplitude, -2 * math.cos(w0), 1 - alpha * amplitude]
        waveform = _biquad(waveform, b, [1 + alpha / amplitude, -2 * math.cos(w0), 1 - alpha / amplitude])
    return waveform


def gain(waveform: torch.Tensor, gain_db: float) -> torch.Tensor:
    return waveform * 10 ** (gain_db / 20)


# ----------------------------------------------------------------------------- the chain


def _happens(prob: float, generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < prob


def _uniform(bounds: tuple[float, float], generator: torch.Generator) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator))


def _log_uniform(bounds: tuple[float, float], generator: torch.Generator) -> float:
    return math.exp(_uniform((math.log(bounds[0]), math.log(bounds[1])), generator))


def _choice(options: Sequence, generator: torch.Generator):
    return options[int(torch.randint(len(options), (), generator=generator))]


def augment(waveform: torch.Tensor, sample_rate: int, config: AugmentConfig, generator: torch.Generator,
            others: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole chain, each effect with its probability; `others` (same rate) feed babble noise."""
    if config.speed.enabled:
        waveform = speed(waveform, _choice(config.speed.factors, generator))
    if _happens(config.pitch.prob, generator):
        waveform = pitch_shift(waveform, sample_rate, _uniform(config.pitch.semitones, generator))
    if _happens(config.reverb.prob, generator):
        rt60, drr_db = _uniform(config.reverb.rt60, generator), _uniform(config.reverb.drr_db, generator)
        waveform = reverberate(waveform, sample_rate, rt60, drr_db, generator)
    if _happens(config.noise.prob, generator):
        noise = config.noise
        kind, snr_db = _choice(noise.kinds, generator), _uniform(noise.snr_db, generator)
        if kind == "babble":
            fewest, most = noise.babble_speakers
            speakers = int(torch.randint(fewest, most + 1, (), generator=generator))
            sound = babble(waveform.numel(), others, speakers, generator)
        else:
            sound = colored_noise(waveform.numel(), sample_rate, kind, generator)
        waveform = add_noise(waveform, sound, snr_db)
    if _happens(config.channel.prob, generator):
        channel = config.channel
        if _happens(channel.telephone_prob, generator):
            waveform = telephone(waveform, sample_rate, channel.telephone_8khz)
        else:
            low_hz, high_hz = _uniform(channel.low_cut_hz, generator), _uniform(channel.high_cut_hz, generator)
            waveform = band_limit(waveform, sample_rate, low_hz, high_hz)
        peaks = [(_log_uniform(channel.eq_hz, generator), _uniform(channel.eq_gain_db, generator))
                 for _ in range(channel.eq_bands)]
        waveform = equalize(waveform, sample_rate, peaks)
    return gain(waveform, _uniform(config.gain_db, generator))
