"""Speech synthesis with the libespeak-ng bundled in the `espeakng-loader` wheel.

A ctypes binding rather than the `espeak-ng` program: no system package to install, and
samples come back in memory (milliseconds per sentence) instead of through wav files.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import espeakng_loader
import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_Synth returns only once the callback has had every sample
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside our process
# espeak_PARAMETER values (speak_lib.h)
_RATE, _PITCH, _RANGE, _WORDGAP, _INTONATION = 1, 3, 4, 7, 9
_POS_CHARACTER, _CHARS_UTF8, _SSML = 1, 1, 0x10
_NOT_FOUND = 2  # EE_NOT_FOUND

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_libc = ctypes.CDLL(None)
_lib: ctypes.CDLL | None = None
_sample_rate = 0
_chunks: list[np.ndarray] = []


@_CALLBACK
def _collect(wav, num_samples, _events):
    # espeak reuses its buffer after we return, so copy; a NULL buffer marks the end.
    if wav and num_samples > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0  # 0 = keep going


def initialize() -> int:
    """Load and initialise the library once per process; returns espeak's sample rate."""
    global _lib, _sample_rate
    if _lib is None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        data = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}), data path {data!r}")
        lib.espeak_SetSynthCallback(_collect)
        _lib, _sample_rate = lib, rate
    return _sample_rate


def list_variants() -> list[str]:
    """Names of the voice variants in the bundled data (m1…m8, f1…f5, klatt…klatt6, whisper, ...)."""
    return sorted(os.listdir(Path(espeakng_loader.get_data_path()) / "voices" / "!v"))


def list_voices() -> list[str]:
    """Names espeak_SetVoiceByName accepts for the bundled languages and dialects (en-us, en-us-nyc,
    de, ...): their file names, which espeak matches case-insensitively."""
    languages = Path(espeakng_loader.get_data_path()) / "lang"
    return sorted(p.name.lower() for p in languages.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Voice:
    """One espeak voice setting: a language or dialect, a variant and the knobs of espeak_SetParameter."""

    name: str  # from list_voices()
    variant: str  # from list_variants(); "" = the voice's own
    rate: int  # words per minute; espeak clamps to 80–450 (espeakRATE)
    pitch: int  # base pitch, 0–99 (espeakPITCH)
    pitch_range: int  # intonation swing around it, 0–99: 0 is a monotone, 50 espeak's own (espeakRANGE)
    word_gap: int  # extra pause between words, in 10 ms at the default rate (espeakWORDGAP)
    intonation: int  # 0 = the voice's own tunes, 1–7 espeak's other intonation groups (espeakINTONATION)


def synthesize(text: str, voice: Voice, ssml: bool) -> tuple[np.ndarray, int]:
    """Speak `text`; returns float32 mono samples in [-1, 1] and espeak's sample rate (22,050 Hz).

    With `ssml`, espeak reads SSML tags in the text (<break time="300ms"/>, <emphasis>); text
    without tags sounds the same either way.

    The samples also depend on what this process spoke before: espeak keeps its pitch-flutter
    phase from one call to the next. The same sequence of calls in a fresh process (or in a
    child forked before any call) gives the same samples.
    """
    initialize()
    lib = _lib
    # espeak silently falls back to its default variant for an unknown one, so check first.
    if voice.variant and voice.variant not in list_variants():
        raise ValueError(f"unknown espeak variant {voice.variant!r}; see ctcflow.espeak.list_variants()")
    name = f"{voice.name}+{voice.variant}" if voice.variant else voice.name
    err = lib.espeak_SetVoiceByName(name.encode())
    if err == _NOT_FOUND:
        raise ValueError(f"unknown espeak voice {voice.name!r}; see ctcflow.espeak.list_voices()")
    if err != 0:
        raise RuntimeError(f"espeak_SetVoiceByName({name!r}) failed with code {err}")
    # Every knob on every call: espeak keeps a parameter's last value from one call to the next.
    for parameter, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.pitch_range),
                             (_WORDGAP, voice.word_gap), (_INTONATION, voice.intonation)):
        lib.espeak_SetParameter(parameter, int(value), 0)
    # espeak seeds its noise generator (breath, whisper) from the clock; fix it. The library
    # also calls libc rand(), so seed that too.
    lib.espeak_ng_SetRandSeed(1)
    _libc.srand(1)
    _chunks.clear()
    data = text.encode()
    flags = _CHARS_UTF8 | (_SSML if ssml else 0)
    err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, flags, None, None)
    if err != 0:
        raise RuntimeError(f"espeak_Synth failed with code {err} for {text!r}")
    samples = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
    _chunks.clear()
    return samples.astype(np.float32) / 32768.0, _sample_rate
