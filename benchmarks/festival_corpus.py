"""A test corpus from a synthesizer the demo never trains on: Debian's festival speaking demo test sentences.

Measurement only: festival is a Debian package (`apt-get install festival festvox-kallpc16k
festvox-us-slt-hts`), and nothing in the pipeline ever trains on it. The sentences come from the
demo corpus's test split (data/corpus/metadata.csv), so every word is in the demo's vocabulary and
LM; the voices alternate between festival's male diphone voice (kal) and its female HTS voice
(slt). Writes OUT/wav/*.wav and OUT/list.csv (path, text, speaker), which the manifest readers take
as `source: table`.

    python benchmarks/festival_corpus.py --out data/test_sets/festival --sentences 120

With --digits it speaks "zero" … "nine" instead, in both voices at three speaking rates (festival's
Duration_Stretch 0.8, 1.0, 1.25): 60 utterances, the FSDD recipe's unseen synthesizer.

    python benchmarks/festival_corpus.py --digits --out recipes/fsdd/data/test_sets/festdigits
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from ctcflow.sources import DIGIT_WORDS

VOICES = {"kal": "voice_kal_diphone", "slt": "voice_cmu_us_slt_arctic_hts"}


STRETCHES = (0.8, 1.0, 1.25)


def synthesize(text: str, voice: str, path: Path, stretch: float = 1.0) -> None:
    subprocess.run(["text2wave", "-eval", f"({VOICES[voice]})", "-eval", f"(Parameter.set 'Duration_Stretch {stretch})",
                    "-o", str(path)], input=text, text=True, check=True, capture_output=True, timeout=120)


def digit_rows(out: Path) -> list[dict]:
    rows = []
    for voice in VOICES:
        for stretch in STRETCHES:
            for digit, word in enumerate(DIGIT_WORDS):
                path = Path("wav") / f"{digit}_festival{voice}_{round(stretch * 100)}.wav"
                synthesize(word, voice, out / path, stretch)
                rows.append({"path": str(path), "text": word, "speaker": f"festival-{voice}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/corpus", help="the demo corpus (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder to write the corpus to")
    parser.add_argument("--sentences", type=int, default=120, help="distinct test sentences (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", action="store_true", help="the ten digits, not demo test sentences")
    args = parser.parse_args()
    if shutil.which("text2wave") is None:
        raise SystemExit("text2wave not found: apt-get install festival festvox-kallpc16k festvox-us-slt-hts")
    out = Path(args.out)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rows = digit_rows(out) if args.digits else sentence_rows(Path(args.corpus), out, args.sentences, args.seed)
    pd.DataFrame(rows).to_csv(out / "list.csv", index=False)
    print(f"{len(rows)} utterances ({', '.join(VOICES)}) in {out}")


def sentence_rows(corpus: Path, out: Path, count: int, seed: int) -> list[dict]:
    metadata = pd.read_csv(corpus / "metadata.csv")
    sentences = metadata.loc[metadata["split"] == "test", "text"].drop_duplicates()
    sentences = sentences.sample(n=min(count, len(sentences)), random_state=seed).tolist()
    rows = []
    for i, text in enumerate(sentences):
        voice = list(VOICES)[i % len(VOICES)]
        path = Path("wav") / f"festival-{voice}-{i:04d}.wav"
        synthesize(text, voice, out / path)
        rows.append({"path": str(path), "text": text, "speaker": f"festival-{voice}"})
    return rows


if __name__ == "__main__":
    main()
