"""What a user meets in the synth and featurize params: odd values refused with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import merge, tiny_params
from ctcflow.augment import equalize
from ctcflow.params import ParamsError, load_section
from stages.featurize import FeaturizeParams
from stages.runner import StageError
from stages.synth import SynthParams, load_grammar

BOOLEAN = "should be a number, not true or false (YAML reads yes/no/on/off as booleans)"


def load(tmp_path: Path, section: str, schema, text: str):
    """`section` of the tiny params with `text` (YAML, as a user writes it) merged in."""
    params = merge(tiny_params(), {section: yaml.safe_load(text)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_section(section, schema, tmp_path / "params.yaml")


def error_lines(tmp_path: Path, section: str, schema, text: str) -> list[str]:
    with pytest.raises(ParamsError) as raised:
        load(tmp_path, section, schema, text)
    return str(raised.value).splitlines()[1:]


@pytest.mark.parametrize(("text", "key", "value"), [
    ("augment: {copies: yes}", "augment.copies", True),
    ("augment: {seed: on}", "augment.seed", True),
    ("augment: {pitch: {prob: no, semitones: [-2.0, 2.0]}}", "augment.pitch.prob", False),
    ("augment: {speed: {enabled: true, factors: [yes]}}", "augment.speed.factors.0", True),
    ("augment: {noise: {prob: 0.5, snr_db: [5.0, 30.0], kinds: [white], babble_speakers: [yes, 2]}}",
     "augment.noise.babble_speakers.0", True),
    ("shard_mb: yes", "shard_mb", True),
    ("n_mels: yes", "n_mels", True),
    ("num_workers: yes", "num_workers", True),
    ("silence_db: off", "silence_db", False),
    ("clip_warn_fraction: yes", "clip_warn_fraction", True),
])
def test_featurize_refuses_a_yaml_boolean_for_a_number(tmp_path, text, key, value):
    # Before: copies: yes made 1 copy, prob: no 0.0, shard_mb: yes 1 MB, n_mels: yes 1 band, without a word.
    assert error_lines(tmp_path, "featurize", FeaturizeParams, text) == [
        f"  featurize.{key}: Value error, {BOOLEAN} (got {value})"]


@pytest.mark.parametrize(("text", "key", "value"), [
    ("seed: yes", "seed", True),
    ("break_probability: no", "break_probability", False),
    ("emphasis_probability: yes", "emphasis_probability", True),
    ("word_list_words: [yes, 4]", "word_list_words.0", True),
    ("intonation: [no, 7]", "intonation.0", False),
    ("splits: {train: {utterances: 30, speakers: 6, word_lists: yes}}", "splits.train.word_lists", True),
])
def test_synth_refuses_a_yaml_boolean_for_a_number(tmp_path, text, key, value):
    assert error_lines(tmp_path, "synth", SynthParams, text) == [
        f"  synth.{key}: Value error, {BOOLEAN} (got {value})"]


def test_booleans_and_numbers_that_are_meant_still_load(tmp_path):
    params = load(tmp_path, "featurize", FeaturizeParams, "{strict: yes, augment: {copies: 2, speed: {enabled: on, "
                  "factors: [0.9, 1.1]}}, shard_mb: 64}")
    assert (params.strict, params.augment.copies, params.augment.speed.enabled, params.shard_mb) == (
        True, 2, True, 64.0)
    synth = load(tmp_path, "synth", SynthParams, "{seed: 7, break_probability: 0}")
    assert (synth.seed, synth.break_probability) == (7, 0.0)


def test_an_infinite_shard_size_is_refused_when_the_params_are_read(tmp_path):
    # Before: accepted, then int(inf * 1e6) raised OverflowError (a traceback) once featurize had started.
    assert error_lines(tmp_path, "featurize", FeaturizeParams, "shard_mb: .inf") == [
        "  featurize.shard_mb: Input should be a finite number (got inf)"]


@pytest.mark.parametrize(("n_mels", "empty"), [(128, 4), (201, 22), (500, 182)])
def test_mel_bands_without_an_fft_bin_are_refused(tmp_path, n_mels, empty):
    # Before: accepted with a torchaudio warning; each all-zero band's feature was the constant log(1e-10),
    # which the std floor of the statistics turns into about -54 on every frame.
    assert error_lines(tmp_path, "featurize", FeaturizeParams, f"n_mels: {n_mels}") == [
        f"  featurize.n_mels: {n_mels} mel bands leave {empty} without an FFT bin at n_fft 400 and 16000 Hz "
        "(all-zero filters, constant features); use fewer mel bands or a larger n_fft"]


def test_mel_bands_that_fit_still_load(tmp_path):
    assert load(tmp_path, "featurize", FeaturizeParams, "n_mels: 80").n_mels == 80
    assert load(tmp_path, "featurize", FeaturizeParams, "{n_fft: 1024, win_length: 1024, n_mels: 128}").n_mels == 128


@pytest.mark.parametrize(("text", "hop", "win"), [("hop_length: 401", 401, 400),
                                                ("{win_length: 100, hop_length: 160}", 160, 100)])
def test_a_hop_longer_than_the_window_is_refused(tmp_path, text, hop, win):
    # Before: accepted, and the samples between two windows reached no frame.
    assert error_lines(tmp_path, "featurize", FeaturizeParams, text) == [
        f"  featurize: hop_length {hop} must not exceed win_length {win}: the samples between two windows "
        "would be heard by no frame"]
    assert load(tmp_path, "featurize", FeaturizeParams, "{win_length: 160, hop_length: 160}").hop_length == 160


def test_an_eq_centre_above_nyquist_writes_nan():
    """Why the check below: the peaking filter past Nyquist is unstable."""
    tone = torch.sin(torch.arange(8000) * 0.3)
    assert not torch.isfinite(equalize(tone, 8000, [(6000.0, 8.0)])).all()
    assert torch.isfinite(equalize(tone, 8000, [(3900.0, 8.0)])).all()


def test_the_demo_channel_is_refused_for_8khz_audio_with_copies(tmp_path):
    # Before: accepted; about a quarter of the channel draws put an EQ centre above 4 kHz: NaN frames.
    assert error_lines(tmp_path, "featurize", FeaturizeParams, "{sample_rate: 8000, augment: {copies: 1}}") == [
        "  featurize.augment: channel.eq_hz [100.0, 6000.0] must stay below the Nyquist frequency, 4000 Hz at "
        "featurize.sample_rate 8000 (above it: NaN frames)"]
    channel = tiny_params()["featurize"]["augment"]["channel"]
    text = yaml.safe_dump({"augment": {"copies": 1, "channel": {**channel, "low_cut_hz": [0.0, 9000.0]}}})
    assert error_lines(tmp_path, "featurize", FeaturizeParams, text) == [
        "  featurize.augment: channel.low_cut_hz [0.0, 9000.0] must stay below the Nyquist frequency, 8000 Hz at "
        "featurize.sample_rate 16000 (above it: NaN frames)"]


def test_the_channel_is_not_checked_when_it_never_runs(tmp_path):
    assert load(tmp_path, "featurize", FeaturizeParams, "{sample_rate: 8000, augment: {copies: 0}}").sample_rate == 8000
    channel = tiny_params()["featurize"]["augment"]["channel"]
    text = yaml.safe_dump({"sample_rate": 8000, "augment": {"copies": 1, "channel": {**channel, "prob": 0.0}}})
    assert load(tmp_path, "featurize", FeaturizeParams, text).augment.channel.prob == 0.0


@pytest.mark.parametrize(("slot", "message"), [
    ("red", "slot 'colour' must be a list of phrases, got str 'red'"),
    ("{red: 1}", "slot 'colour' must be a list of phrases, got dict {'red': 1}"),
])
def test_a_grammar_slot_that_is_not_a_list_is_refused(tmp_path, slot, message):
    # Before: a string slot was spoken letter by letter ("turn on the e light"); a mapping raised TypeError.
    grammar = tmp_path / "grammar.yaml"
    grammar.write_text(f'templates: ["turn on the {{colour}} light"]\nslots:\n  colour: {slot}\n')
    with pytest.raises(StageError) as raised:
        load_grammar(grammar, 0)
    assert str(raised.value) == f"{grammar}: {message}"


def test_a_sped_up_copy_of_a_short_clip_can_be_pitch_shifted():
    # featurize keeps a clip of more than n_fft (400) samples; its copy at speed 2 has 240, fewer than
    # half the pitch shifter's 512-sample window. Before: RuntimeError (reflection padding) mid-featurize.
    from ctcflow.augment import AugmentConfig, augment

    off = {"prob": 0.0}
    config = AugmentConfig.from_dict({
        "speed": {"enabled": True, "factors": [2.0]}, "pitch": {"prob": 1.0, "semitones": [2.0, 2.0]},
        "reverb": {**off, "rt60": [0.2, 0.2], "drr_db": [0.0, 0.0]},
        "noise": {**off, "snr_db": [10.0, 10.0], "kinds": ["white"], "babble_speakers": [1, 1]},
        "channel": {**off, "telephone_prob": 0.0, "telephone_8khz": False, "low_cut_hz": [0.0, 0.0],
                    "high_cut_hz": [8000.0, 8000.0], "eq_bands": 0, "eq_hz": [100.0, 100.0], "eq_gain_db": [0.0, 0.0]},
        "gain_db": [0.0, 0.0]})
    copy = augment(torch.sin(torch.arange(480) * 0.3), 16000, config, torch.Generator().manual_seed(0), [])
    assert copy.shape == (240,) and torch.isfinite(copy).all()


def test_a_bad_gain_is_named_by_its_own_key(tmp_path):
    # Before: "featurize.augment: Value error, gain_db is a (low, high) range, ..." followed by every
    # setting of the augment section on the same line.
    assert error_lines(tmp_path, "featurize", FeaturizeParams, "augment: {gain_db: [6.0, -6.0]}") == [
        "  featurize.augment.gain_db: Value error, gain_db is a (low, high) range, got [6.0, -6.0] (got [6.0, -6.0])"]


def test_a_bad_effect_setting_is_one_line_naming_the_effect_and_the_setting(tmp_path):
    text = "augment: {pitch: {prob: 1.5, semitones: [-2.0, 2.0]}}"
    assert error_lines(tmp_path, "featurize", FeaturizeParams, text) == [
        "  featurize.augment.pitch: Value error, prob must be between 0 and 1, got 1.5 "
        "(got {'prob': 1.5, 'semitones': [-2.0, 2.0]})"]


@pytest.mark.parametrize(("keep", "split"), [(1, "valid"), (2, "train")])
def test_excluding_nearly_every_variant_says_so(keep, split):
    # Before: "valid: 2 speakers wanted but its 0 variants give only 0 (dialect, variant) pairs; ask for
    # fewer speakers", which no speaker count fixes.
    from conftest import section
    from ctcflow import espeak
    from stages.synth import draw_speakers

    params = section("synth", SynthParams, exclude_variants=espeak.list_variants()[keep:])
    with pytest.raises(StageError) as raised:
        draw_speakers(params)
    assert str(raised.value) == (f"{split}: no espeak variant is left for it; each split needs its own, and the {keep} "
                                 "that synth.exclude_variants leaves are used up: exclude fewer variants")


def test_every_section_refuses_a_yaml_boolean_for_a_number(tmp_path):
    # One rule for all of params.yaml (ctcflow.params.Section): `retries: yes` was 1 retry, `num_examples: no` none.
    from pipeline.config import FlowParams
    from stages.evaluate import EvaluateParams

    assert error_lines(tmp_path, "evaluate", EvaluateParams, "num_examples: no") == [
        f"  evaluate.num_examples: Value error, {BOOLEAN} (got False)"]
    assert error_lines(tmp_path, "flow", FlowParams, "retries: yes") == [
        f"  flow.retries: Value error, {BOOLEAN} (got True)"]
