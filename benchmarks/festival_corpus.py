"""A test corpus from a synthesizer the demo never trains on: Debian's festival speaking demo test sentences.

Measurement only: festival is a Debian package (`apt-get install festival festvox-kallpc16k
festvox-us-slt-hts`), and nothing in the pipeline ever trains on it. The sentences come from the
demo corpus's test split (data/corpus/metadata.csv), so every word is in the demo's vocabulary and
LM; the voices alternate between festival's male diphone voice (kal) and its female HTS voice
(slt). Writes OUT/wav/*.wav and OUT/list.csv (path, text, speaker), which the manifest readers take
as `source: table`.

    python benchmarks/festival_corpus.py --out data/test_sets/festival --sentences 120
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pandas as pd

VOICES = {"kal": "voice_kal_diphone", "slt": "voice_cmu_us_slt_arctic_hts"}


def synthesize(text: str, voice: str, path: Path) -> None:
    subprocess.run(["text2wave", "-eval", f"({VOICES[voice]})", "-o", str(path)], input=text, text=True,
                   check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/corpus", help="the demo corpus (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder to write the corpus to")
    parser.add_argument("--sentences", type=int, default=120, help="distinct test sentences (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("text2wave") is None:
        raise SystemExit("text2wave not found: apt-get install festival festvox-kallpc16k festvox-us-slt-hts")
    metadata = pd.read_csv(Path(args.corpus) / "metadata.csv")
    sentences = metadata.loc[metadata["split"] == "test", "text"].drop_duplicates()
    sentences = sentences.sample(n=min(args.sentences, len(sentences)), random_state=args.seed).tolist()
    out = Path(args.out)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(sentences):
        voice = list(VOICES)[i % len(VOICES)]
        path = Path("wav") / f"festival-{voice}-{i:04d}.wav"
        synthesize(text, voice, out / path)
        rows.append({"path": str(path), "text": text, "speaker": f"festival-{voice}"})
    pd.DataFrame(rows).to_csv(out / "list.csv", index=False)
    print(f"{len(rows)} utterances ({', '.join(VOICES)}) in {out}")


if __name__ == "__main__":
    main()
