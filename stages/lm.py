"""Stage lm: a lexicon and a word n-gram language model from the training transcripts, for beam search.

Reads the normalized transcripts of data/manifests/train.jsonl and the label unit
(data/manifests/tokens.json); writes data/lm/lexicon.txt (every training word with its spelling:
characters, or BPE pieces) and data/lm/lm.arpa (interpolated Kneser-Ney,
lm.order words of context minus one, ARPA format for KenLM), and metrics/lm.json (vocabulary
and n-gram counts, and the share of validation and test words outside the lexicon: beam
search with the lexicon can never output those).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from ctcflow.lm import BOS, EOS, kneser_ney, oov_rate, write_arpa, write_lexicon
from ctcflow.manifest import read_manifest
from ctcflow.params import Section
from ctcflow.text import Tokenizer
from stages.runner import StageError, stage_main

MANIFEST_DIR = Path("data/manifests")
OUT_DIR = Path("data/lm")
METRICS_FILE = Path("metrics/lm.json")


class LmParams(Section):
    order: int = Field(ge=1, le=6)


def run(params: LmParams, manifest_dir: Path = MANIFEST_DIR, out_dir: Path = OUT_DIR,
        metrics_file: Path = METRICS_FILE) -> dict:
    sentences = [t.split() for t in read_manifest(manifest_dir / "train.jsonl")["text_normalized"]]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise StageError(f"{manifest_dir / 'train.jsonl'} has no transcripts to build a language model from")
    vocabulary = {w for s in sentences for w in s}
    # The blank's place does not matter to spellings; train chooses it.
    tokenizer = Tokenizer.load(manifest_dir, blank="last")
    check_words(vocabulary, tokenizer, manifest_dir)
    logprob, backoff = kneser_ney(sentences, params.order)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_lexicon(out_dir / "lexicon.txt", sorted(vocabulary), tokenizer)
    write_arpa(out_dir / "lm.arpa", logprob, backoff)

    metrics = {"sentences": len(sentences), "vocabulary": len(vocabulary),
               "ngrams": {str(n + 1): len(grams) for n, grams in enumerate(logprob)}}
    for split in ("valid", "test"):
        path = manifest_dir / f"{split}.jsonl"
        texts = read_manifest(path)["text_normalized"].tolist() if path.is_file() else []
        metrics[f"{split}_oov_rate"] = oov_rate(texts, vocabulary)
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"lexicon of {len(vocabulary)} words, {params.order}-gram LM from {len(sentences)} transcripts; "
          f"test words outside the lexicon: {metrics['test_oov_rate']:.2%}")
    return metrics


def check_words(vocabulary: set[str], tokenizer: Tokenizer, manifest_dir: Path) -> None:
    """A StageError for training words the LM or the lexicon cannot hold: the ARPA's sentence marks,
    which would end or start a sentence inside one, and words with units outside tokens.json's, which
    the beam search cannot spell (flashlight stops on them: "Unknown entry in dictionary")."""
    train = manifest_dir / "train.jsonl"
    marks = sorted(vocabulary & {BOS, EOS})
    if marks:
        raise StageError(f"{train}: the transcripts hold {', '.join(marks)}, which the ARPA language model "
                         f"reserves for the start and end of a sentence")
    unknown = {word: sorted(tokenizer.unknown(word)) for word in sorted(vocabulary)}
    unknown = {word: units for word, units in unknown.items() if units}
    if unknown:
        shown = ", ".join(f"{word!r} ({' '.join(units)})" for word, units in list(unknown.items())[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise StageError(f"{train}: {len(unknown)} word(s) with units outside {manifest_dir / 'tokens.json'}: "
                         f"{shown}{more}; the beam search could not spell them (rerun the manifest stage, "
                         f"which checks transcripts against the alphabet)")


def main(argv: list[str] | None = None) -> None:
    stage_main("lm", LmParams, run, __doc__, argv)


if __name__ == "__main__":
    main()
