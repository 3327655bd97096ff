"""Speech synthesis with the libespeak-ng bundled in the `espeakng-loader` wheel.

A ctypes binding rather than the `espeak-ng` program: no system package to install, and
samples come back in memory (milliseconds per sentence) instead of through wav files.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import espeakng_loader
import numpy as np

ENGLISH_VOICES = (
    "en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
)

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_Synth returns only once the callback has had every sample
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside our process
_RATE, _PITCH = 1, 3  # espeak_PARAMETER values
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
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
    """Names of the voice variants in the bundled data (m1…m8, f1…f5, klatt, whisper, ...)."""
    return sorted(os.listdir(Path(espeakng_loader.get_data_path()) / "voices" / "!v"))


def synthesize(
    text: str, voice: str = "en-us", variant: str = "f3", rate: int = 175, pitch: int = 50
) -> tuple[np.ndarray, int]:
    """Speak `text`; returns float32 mono samples in [-1, 1] and espeak's sample rate (22,050 Hz).

    The samples also depend on what this process spoke before: espeak keeps its pitch-flutter
    phase from one call to the next. The same sequence of calls in a fresh process (or in a
    child forked before any call) gives the same samples.
    """
    initialize()
    lib = _lib
    # espeak silently falls back to its default variant for an unknown one, so check first.
    if variant and variant not in list_variants():
        raise ValueError(f"unknown espeak variant {variant!r}; see ctcflow.espeak.list_variants()")
    name = f"{voice}+{variant}" if variant else voice
    err = lib.espeak_SetVoiceByName(name.encode())
    if err == _NOT_FOUND:
        raise ValueError(f"unknown espeak voice {voice!r}")
    if err != 0:
        raise RuntimeError(f"espeak_SetVoiceByName({name!r}) failed with code {err}")
    lib.espeak_SetParameter(_RATE, int(rate), 0)
    lib.espeak_SetParameter(_PITCH, int(pitch), 0)
    # espeak seeds its noise generator (breath, whisper) from the clock; fix it. The library
    # also calls libc rand(), so seed that too.
    lib.espeak_ng_SetRandSeed(1)
    _libc.srand(1)
    _chunks.clear()
    data = text.encode()
    err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if err != 0:
        raise RuntimeError(f"espeak_Synth failed with code {err} for {text!r}")
    samples = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
    _chunks.clear()
    return samples.astype(np.float32) / 32768.0, _sample_rate
