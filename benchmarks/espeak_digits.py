"""A test corpus of isolated digits in the demo's test voices: espeak-ng voices the model never heard
saying "zero" … "nine", one word per utterance, as FSDD's speakers do.

It separates what the demo model fails on with real digits: unheard sounds, or words heard out of
the grammar's order (no demo sentence starts with a digit or is one word long). With --context,
each digit comes after "dial" instead ("dial six"), the grammar's own order.

Every voice setting is a test speaker of the synth stage (synth.* of params.yaml), so the corpus
needs no download and shares no voice with training. Writes OUT/wav/*.wav and OUT/list.csv (path,
text, speaker), which the manifest readers take as `source: table` (docs/corpora.md#extra-test-sets).

    python benchmarks/espeak_digits.py --out data/test_sets/espeak_digits
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctcflow import espeak  # noqa: E402
from ctcflow.params import load_section  # noqa: E402
from ctcflow.sources import DIGIT_WORDS  # noqa: E402
from stages.synth import SynthParams, draw_speakers  # noqa: E402

def speak_all(speaker, out: Path, context: bool, sample_rate: int) -> list[dict]:
    """One speaker's ten digits (runs in a fresh child: espeak carries state between calls)."""
    resample = torchaudio.transforms.Resample(espeak.initialize(), sample_rate)
    rows = []
    for digit, word in enumerate(DIGIT_WORDS):
        text = f"dial {word}" if context else word
        audio, _ = espeak.synthesize(text, speaker.voice, ssml=False)
        audio = resample(torch.from_numpy(audio)).numpy()
        path = Path("wav") / f"{digit}_{speaker.name}.wav"
        sf.write(out / path, np.clip(audio, -1, 1), sample_rate, subtype="PCM_16")
        rows.append({"path": str(path), "text": text, "speaker": speaker.name})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the corpus to")
    parser.add_argument("--params", default="params.yaml", help="whose synth section gives the voices (default: %(default)s)")
    parser.add_argument("--context", action="store_true", help='say "dial <digit>" instead of the digit alone')
    args = parser.parse_args()
    params = load_section("synth", SynthParams, args.params)
    speakers = draw_speakers(params)["test"]
    out = Path(args.out)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        parts = pool.starmap(speak_all, [(s, out, args.context, params.sample_rate) for s in speakers])
    rows = [r for part in parts for r in part]
    pd.DataFrame(rows).to_csv(out / "list.csv", index=False)
    print(f"{len(rows)} utterances, {len(speakers)} voices -> {out / 'list.csv'}")


if __name__ == "__main__":
    main()
