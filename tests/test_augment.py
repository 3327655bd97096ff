"""Waveform augmentation: each effect measured on sines, clicks and noise with hand-worked numbers."""

import itertools
import math

import numpy as np
import pytest
import torch
import yaml

from ctcflow.augment import (AugmentConfig, augment, babble, band_limit, colored_noise, equalize, gain, pitch_shift,
                             reverberate, speed, telephone)

from conftest import merge, tiny_params
from ctcflow.params import ParamsError, load_section
from stages.featurize import FeaturizeParams

RATE = 16000

# Every effect off: the params-style mapping each test starts from.
OFF = {
    "speed": {"enabled": False, "factors": [1.0]},
    "pitch": {"prob": 0.0, "semitones": [0.0, 0.0]},
    "reverb": {"prob": 0.0, "rt60": [0.3, 0.3], "drr_db": [0.0, 0.0]},
    "noise": {"prob": 0.0, "snr_db": [10.0, 10.0], "kinds": ["white"], "babble_speakers": [1, 1]},
    "channel": {"prob": 0.0, "telephone_prob": 0.0, "telephone_8khz": False, "low_cut_hz": [0.0, 0.0],
                "high_cut_hz": [8000.0, 8000.0], "eq_bands": 0, "eq_hz": [100.0, 100.0], "eq_gain_db": [0.0, 0.0]},
    "gain_db": [0.0, 0.0],
}


def config(**effects) -> AugmentConfig:
    """OFF with the given effects' settings replaced (gain_db as a list, the others as mappings)."""
    params = {name: {**value, **effects.get(name, {})} for name, value in OFF.items() if name != "gain_db"}
    return AugmentConfig.from_dict({**params, "gain_db": effects.get("gain_db", OFF["gain_db"])})


def sine(hz: float, seconds: float = 1.0, amplitude: float = 0.5) -> torch.Tensor:
    return amplitude * torch.sin(2 * math.pi * hz * torch.arange(round(seconds * RATE)) / RATE)


def speech_like(seed: int, seconds: float = 1.0) -> torch.Tensor:
    """Two tones with a noisy syllable envelope: enough structure for every effect to change it."""
    time = torch.arange(round(seconds * RATE)) / RATE
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 4 * time)
    noise = 0.05 * torch.randn(time.numel(), generator=torch.Generator().manual_seed(seed))
    return envelope * (0.3 * torch.sin(2 * math.pi * 220 * time) + 0.2 * torch.sin(2 * math.pi * 1250 * time)) + noise


def peak_hz(waveform: torch.Tensor) -> float:
    """FFT peak of a Hann-windowed, zero-padded waveform: 0.015 Hz bins."""
    spectrum = torch.fft.rfft(waveform * torch.hann_window(waveform.numel()), n=2**20).abs()
    return int(spectrum.argmax()) * RATE / 2**20


def rms_db(waveform: torch.Tensor) -> float:
    return 10 * math.log10(float(waveform.double().square().mean()))


OTHERS = [speech_like(seed, seconds) for seed, seconds in [(11, 0.7), (12, 1.3), (13, 0.4)]]

# Each effect always on, with wide ranges.
PITCH = {"prob": 1.0, "semitones": [-3.0, 3.0]}
REVERB = {"prob": 1.0, "rt60": [0.2, 0.8], "drr_db": [0.0, 10.0]}
CHANNEL = {"prob": 1.0, "telephone_prob": 0.5, "telephone_8khz": True, "low_cut_hz": [50.0, 300.0],
           "high_cut_hz": [3000.0, 7500.0], "eq_bands": 3, "eq_hz": [100.0, 6000.0], "eq_gain_db": [-10.0, 10.0]}
GAIN_DB = [-10.0, 10.0]


def noise(*kinds: str) -> dict:
    return {"prob": 1.0, "snr_db": [0.0, 20.0], "kinds": list(kinds), "babble_speakers": [1, 3]}


EFFECTS = {
    "pitch": config(pitch=PITCH),
    "reverb": config(reverb=REVERB),
    **{f"noise_{kind}": config(noise=noise(kind)) for kind in ["white", "pink", "brown", "babble"]},
    "channel": config(channel=CHANNEL),
    "gain": config(gain_db=GAIN_DB),
    "all": config(speed={"enabled": True, "factors": [0.9, 1.0, 1.1]}, pitch=PITCH, reverb=REVERB,
                  noise=noise("white", "pink", "brown", "babble"), channel=CHANNEL, gain_db=GAIN_DB),
}


def run(settings: AugmentConfig, seed: int, waveform: torch.Tensor | None = None) -> torch.Tensor:
    waveform = speech_like(0) if waveform is None else waveform
    return augment(waveform, RATE, settings, torch.Generator().manual_seed(seed), OTHERS)


def test_everything_off_returns_the_input_unchanged():
    waveform = speech_like(0)
    assert torch.equal(run(config(), 5, waveform), waveform)


@pytest.mark.parametrize("effect", sorted(EFFECTS))
def test_each_effect_is_a_function_of_the_seed(effect):
    settings = EFFECTS[effect]
    with torch.random.fork_rng():  # the global generator differs between the two runs and must not matter
        torch.manual_seed(1)
        first = run(settings, 7)
        torch.manual_seed(2)
        again = run(settings, 7)
    assert torch.equal(first, again)
    assert torch.isfinite(first).all()
    outputs = [first] + [run(settings, seed) for seed in [8, 9, 10]]
    for one, other in itertools.combinations(outputs, 2):
        assert one.shape != other.shape or not torch.equal(one, other)


def test_speed_factor_is_drawn_per_seed_from_the_list():
    settings = config(speed={"enabled": True, "factors": [0.9, 1.1]})
    lengths = {run(settings, seed).numel() for seed in range(8)}
    assert lengths == {17778, 14546}  # 16000 / 0.9 and 16000 / 1.1, rounded up by the resampler


@pytest.mark.parametrize(("factor", "expected_length"), [(0.9, 17778), (1.1, 14545), (0.95, 16842), (1.0, 16000)])
def test_speed_changes_the_length_by_the_factor(factor, expected_length):
    assert abs(speed(sine(440), factor).numel() - expected_length) <= 1


def test_speed_moves_a_sine_by_the_factor():
    assert peak_hz(speed(sine(440), 1.1)) == pytest.approx(484.0, abs=0.5)
    assert peak_hz(speed(sine(440), 0.9)) == pytest.approx(396.0, abs=0.5)


@pytest.mark.parametrize("kind", ["white", "pink", "brown", "babble"])
@pytest.mark.parametrize("snr_db", [-5.0, 7.5, 30.0])
def test_noise_lands_at_the_requested_snr(kind, snr_db):
    clean = speech_like(3)
    settings = config(noise={"prob": 1.0, "snr_db": [snr_db, snr_db], "kinds": [kind], "babble_speakers": [2, 2]})
    noisy = run(settings, 4, clean)
    assert rms_db(clean) - rms_db(noisy - clean) == pytest.approx(snr_db, abs=0.5)


@pytest.mark.parametrize(("kind", "db_per_octave"), [("white", 0.0), ("pink", -3.01), ("brown", -6.02)])
def test_noise_spectrum_falls_by_the_kind_slope(kind, db_per_octave):
    """Power per Hz in the octaves 125 Hz … 8 kHz: 1/f loses 3 dB per octave, 1/f² 6 dB."""
    noise = colored_noise(2**18, RATE, kind, torch.Generator().manual_seed(0))
    power = torch.fft.rfft(noise.double()).abs().square()
    hz = torch.fft.rfftfreq(noise.numel(), 1 / RATE)
    octaves = [10 * math.log10(float(power[(hz >= low) & (hz < 2 * low)].mean()))
               for low in [125, 250, 500, 1000, 2000, 4000]]
    slope = np.polyfit(range(len(octaves)), octaves, 1)[0]
    assert slope == pytest.approx(db_per_octave, abs=0.3)
    assert float(noise.square().mean()) == pytest.approx(1.0, abs=1e-5)


def test_noise_has_nothing_below_20_hz():
    noise = colored_noise(RATE * 4, RATE, "brown", torch.Generator().manual_seed(0))
    power = torch.fft.rfft(noise.double()).abs().square()
    # Bins of 0.25 Hz. Not zero: the noise is cut from a longer one, and the cut leaks (-28 dB here);
    # brown noise without the floor would have most of its power there.
    assert float(power[: 4 * 20].sum()) < 0.01 * float(power.sum())


def test_babble_loops_each_utterance_from_a_random_offset_at_unit_rms():
    talker = torch.arange(1.0, 11.0)  # 10 samples, looped to 25
    offsets = set()
    for seed in range(5):
        mix = babble(25, [talker], 1, torch.Generator().manual_seed(seed))
        assert float(mix.square().mean()) == pytest.approx(1.0, rel=1e-5)
        assert torch.equal(mix[10:20], mix[:10]) and torch.equal(mix[20:], mix[:5])
        cycle = (mix[:10] / mix[:10].min()).round()  # the talker's 1 … 10, rotated by the offset
        offset = int(cycle[0]) - 1
        assert torch.equal(cycle, talker.roll(-offset))
        offsets.add(offset)
    assert len(offsets) > 1
    with pytest.raises(ValueError, match="other utterances"):
        babble(25, [], 1, torch.Generator().manual_seed(0))


def test_unknown_noise_kind_is_refused():
    with pytest.raises(ValueError, match="violet"):
        config(noise={"kinds": ["pink", "violet"]})


def schroeder_rt60(tail: torch.Tensor) -> float:
    """RT60 from the backward-integrated energy's slope between -5 and -35 dB."""
    energy = tail.double().square().flip(0).cumsum(0).flip(0)
    decay_db = 10 * torch.log10(energy / energy[0])
    used = (decay_db <= -5) & (decay_db >= -35)
    seconds = torch.arange(tail.numel())[used].double() / RATE
    slope_db_per_s = np.polyfit(seconds.numpy(), decay_db[used].numpy(), 1)[0]
    return -60 / slope_db_per_s


@pytest.mark.parametrize("rt60", [0.25, 0.6])
def test_reverb_tail_decays_with_the_requested_rt60(rt60):
    click = torch.zeros(RATE)
    click[1000] = 1.0
    wet = reverberate(click, RATE, rt60, 3.0, torch.Generator().manual_seed(0))
    assert wet.numel() == click.numel()
    assert rms_db(wet) == pytest.approx(rms_db(click), abs=0.01)
    assert float(wet[:1000].abs().max()) < 1e-6  # nothing before the click but FFT round-off
    direct, tail = wet[1000], wet[1001:]
    assert 10 * math.log10(float(direct**2 / tail.double().square().sum())) == pytest.approx(3.0, abs=0.01)
    assert schroeder_rt60(tail) == pytest.approx(rt60, rel=0.1)


def loss_db(effect, hz: float) -> float:
    """Level change of a 1-s sine through `effect`, measured past the filters' start-up."""
    tone = sine(hz)
    steady = slice(RATE // 4, None)
    return rms_db(effect(tone)[steady]) - rms_db(tone[steady])


@pytest.mark.parametrize("through_8khz", [False, True])
def test_telephone_keeps_only_300_to_3400_hz(through_8khz):
    def phone(tone):
        return telephone(tone, RATE, through_8khz)

    assert phone(sine(1000)).numel() == RATE
    assert loss_db(phone, 1000) == pytest.approx(0.0, abs=1.0)
    assert loss_db(phone, 100) <= -20
    assert loss_db(phone, 6000) <= -20


def test_band_limit_is_butterworth_at_the_cutoffs():
    def banded(tone):
        return band_limit(tone, RATE, 500.0, 2000.0)

    assert loss_db(banded, 500) == pytest.approx(-3.01, abs=0.01)  # half power at each cut-off
    assert loss_db(banded, 2000) == pytest.approx(-3.01, abs=0.01)
    assert loss_db(banded, 1000) == pytest.approx(0.0, abs=0.01)
    assert loss_db(banded, 250) <= -45  # 8th order: 48 dB one octave out
    assert loss_db(banded, 4000) <= -45


def test_band_limit_with_no_cutoffs_is_the_identity():
    tone = sine(50) + sine(7900)
    assert torch.equal(band_limit(tone, RATE, 0.0, RATE / 2), tone)


def test_telephone_through_8khz_removes_what_the_band_filter_leaves_above_4khz():
    assert loss_db(lambda tone: telephone(tone, RATE, False), 4500) > -35
    assert loss_db(lambda tone: telephone(tone, RATE, True), 4500) <= -45


def test_equalizer_peak_gains_its_decibels_at_its_centre():
    def boosted(tone):
        return equalize(tone, RATE, [(1000.0, 6.0)])

    assert loss_db(boosted, 1000) == pytest.approx(6.0, abs=0.01)
    assert abs(loss_db(boosted, 100)) < 0.1  # about 3 octaves away
    tone = speech_like(0)
    undone = equalize(tone, RATE, [(1000.0, 6.0), (1000.0, -6.0)])  # a cut is the boost's inverse
    torch.testing.assert_close(undone, tone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("gain_db", [-12.5, 0.0, 6.0])
def test_gain_changes_rms_by_the_decibels_asked(gain_db):
    tone = speech_like(0)
    assert rms_db(gain(tone, gain_db)) - rms_db(tone) == pytest.approx(gain_db, abs=0.01)


@pytest.mark.parametrize(("semitones", "expected_hz"), [(2.0, 493.88), (-3.0, 369.99), (0.5, 452.89)])
def test_pitch_shift_moves_a_sine_and_keeps_the_length(semitones, expected_hz):
    tone = sine(440, 1.003)  # 16048 samples: not a whole number of STFT hops
    shifted = pitch_shift(tone, RATE, semitones)
    assert shifted.numel() == tone.numel()
    assert peak_hz(shifted) == pytest.approx(expected_hz, rel=0.01)


@pytest.mark.parametrize(("effects", "message"), [
    ({"speed": {"factors": []}}, "factors must list at least one speed factor"),
    ({"speed": {"factors": [0.0]}}, r"factors must lie within \[0.5, 2\] \(half to twice the speed\), got \[0.0\]"),
    ({"pitch": {"semitones": [-100.0, -100.0]}}, r"semitones must lie within \[-12, 12\]"),
    ({"reverb": {"rt60": [-0.5, 0.3]}}, r"rt60 must lie within \[0.01, 10\] \(seconds\)"),
    ({"noise": {"babble_speakers": [-3, -1]}}, r"babble_speakers must lie within \[1, 100\]"),
    ({"noise": {"snr_db": [float("nan"), 10.0]}}, r"snr_db must lie within \[-60, 120\] \(dB\), got \[nan, 10.0\]"),
    ({"channel": {"eq_hz": [0.0, 0.0]}}, r"eq_hz must lie within \[1, 1e\+06\]"),
    ({"channel": {"eq_bands": -2}}, r"eq_bands must lie within \[0, 32\]"),
    ({"gain_db": [600.0, 600.0]}, r"gain_db must lie within \[-60, 60\] \(dB\), got \[600.0, 600.0\]"),
])
def test_settings_an_effect_cannot_take_are_refused(effects, message):
    # Each of these used to fail halfway through featurize (speed [], semitones -100, eq_hz 0) or
    # write NaN frames without a word (gain_db 600).
    with pytest.raises(ValueError, match=message):
        config(**effects)


def test_the_featurize_params_refuse_a_gain_the_chain_cannot_take(tmp_path):
    params = merge(tiny_params(), {"featurize": {"augment": {"gain_db": [600.0, 600.0]}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"featurize\.augment\b.*gain_db must lie within \[-60, 60\]"):
        load_section("featurize", FeaturizeParams, tmp_path / "params.yaml")
