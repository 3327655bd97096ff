"""CTC decoding: greedy (best path) and flashlight beam search, a decode-time blank penalty,
and word timings and confidences from the CTC alignment of a hypothesis."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torchaudio.functional as AF
from pydantic import Field, model_validator

from ctcflow.data import frame_mask
from ctcflow.params import Section
from ctcflow.text import Tokenizer

# Names the flashlight decoder knows our blank and space classes by ('|' is its word separator).
BLANK_TOKEN, SPACE_TOKEN = "<blank>", "|"
IMPOSSIBLE = -1e4  # a log-probability no path takes, finite: flashlight sums scores


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best path per utterance: argmax per frame, merge repeats, drop blanks.

    log_probs: (batch, frames, classes); lengths: valid frames per utterance.
    """
    best = log_probs.argmax(dim=-1).cpu()
    hypotheses = []
    for path, length in zip(best, lengths.tolist()):
        merged = torch.unique_consecutive(path[:length])
        hypotheses.append(merged[merged != blank].tolist())
    return hypotheses


def penalize_blank(log_probs: torch.Tensor, blank: int, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the blank log-probability of every frame (not renormalized:
    decoders compare scores, so only the shift between blank and the other classes matters)."""
    if penalty == 0:
        return log_probs
    out = log_probs.clone()
    out[..., blank] -= penalty
    return out


class GreedyDecoder:
    """Best-path transcripts; also counts the frames whose (penalized) argmax is blank."""

    def __init__(self, tokenizer: Tokenizer, blank_penalty: float):
        self.tokenizer = tokenizer
        self.blank_penalty = blank_penalty
        self.frames = self.blank_frames = 0

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        scores = penalize_blank(log_probs, self.tokenizer.blank, self.blank_penalty)
        real = frame_mask(lengths, scores.shape[1])
        self.frames += int(real.sum())
        self.blank_frames += int(((scores.argmax(dim=-1) == self.tokenizer.blank) & real.to(scores.device)).sum())
        return [self.tokenizer.decode(ids) for ids in greedy_decode(scores, lengths, self.tokenizer.blank)]

    @property
    def blank_ratio(self) -> float:
        return self.blank_frames / max(self.frames, 1)


class BeamParams(Section):
    """The beam search settings (evaluate.beam in params.yaml)."""

    beam_size: int = Field(ge=1)
    beam_threshold: float = Field(gt=0)
    lexicon: bool
    lm_weight: float = Field(ge=0)
    word_score: float

    @model_validator(mode="after")
    def lm_needs_lexicon(self):
        if self.lm_weight > 0 and not self.lexicon:
            raise ValueError("lm_weight > 0 needs lexicon: true (the word LM scores lexicon words)")
        return self

    def decoder(self, tokenizer: Tokenizer, lm_dir: str | Path, blank_penalty: float) -> "BeamSearchDecoder":
        """lm_dir holds lexicon.txt and lm.arpa, as the lm stage writes them."""
        lm_dir = Path(lm_dir)
        return BeamSearchDecoder(tokenizer, self.beam_size, self.beam_threshold,
                                 lexicon=lm_dir / "lexicon.txt" if self.lexicon else None,
                                 lm=lm_dir / "lm.arpa" if self.lm_weight > 0 else None,
                                 lm_weight=self.lm_weight, word_score=self.word_score, blank_penalty=blank_penalty)


class BeamSearchDecoder:
    """torchaudio's `ctc_decoder` (flashlight-text): beam search over characters or BPE pieces,
    optionally restricted to the words of a lexicon and scored by a word n-gram LM (ARPA, read by KenLM).

    Without a lexicon the search is lexicon-free and uses no LM (a word LM needs word ends
    to come from a lexicon). With BPE pieces the lexicon's words are spelled in pieces (see
    bpe_lexicon), and the blank stands in for flashlight's silence token, which BPE has none of.
    """

    def __init__(self, tokenizer: Tokenizer, beam_size: int, beam_threshold: float, lexicon: str | Path | None,
                 lm: str | Path | None, lm_weight: float, word_score: float, blank_penalty: float):
        from torchaudio.models.decoder import ctc_decoder  # imports flashlight-text, only when needed

        if lm is not None and lexicon is None:
            raise ValueError("a word language model needs a lexicon")
        for path in (lexicon, lm):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{path} not found (run the lm stage first)")
        clash = {BLANK_TOKEN, SPACE_TOKEN} & set(tokenizer.alphabet)
        if clash:
            raise ValueError(f"the alphabet must not contain the decoder's reserved tokens {sorted(clash)}")
        self.tokenizer = tokenizer
        self.blank_penalty = blank_penalty
        with tempfile.TemporaryDirectory() as scratch:  # flashlight reads the lexicon from a file, once
            if lexicon is not None and tokenizer.unit == "bpe":
                lexicon = bpe_lexicon(Path(lexicon), Path(scratch) / "lexicon.txt")
            self.decoder = ctc_decoder(
                lexicon=None if lexicon is None else str(lexicon),
                tokens=decoder_tokens(tokenizer),
                lm=None if lm is None else str(lm),
                beam_size=beam_size,
                beam_threshold=beam_threshold,
                lm_weight=lm_weight,
                word_score=word_score,
                blank_token=BLANK_TOKEN,
                sil_token=BLANK_TOKEN if tokenizer.unit == "bpe" else SPACE_TOKEN,
            )
        self.uses_lexicon = lexicon is not None
        # With characters, a lexicon word ends on its spelling's last unit, the space ("a d d |").
        self.word_end = (decoder_tokens(tokenizer).index(SPACE_TOKEN)
                         if lexicon is not None and tokenizer.unit == "char" else None)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        scores = penalize_blank(log_probs, self.tokenizer.blank, self.blank_penalty)
        scores = scores.detach().to("cpu", torch.float32).contiguous()
        lengths = lengths.to("cpu", torch.int64)
        if self.word_end is not None:
            scores, lengths = end_with_word_end(scores, lengths, self.word_end)
        results = self.decoder(scores, lengths.to(torch.int32))
        return [self._text(nbest[0]) if nbest else "" for nbest in results]

    def _text(self, hypothesis) -> str:
        if self.uses_lexicon:
            return " ".join(hypothesis.words)
        units = [u for u in self.decoder.idxs_to_tokens(hypothesis.tokens) if u != BLANK_TOKEN]
        return " ".join(self.tokenizer.join(u.replace(SPACE_TOKEN, " ") for u in units).split())


def end_with_word_end(scores: torch.Tensor, lengths: torch.Tensor, word_end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One more frame after each utterance, certain of the word end (the space). Transcripts have no
    space after their last word, so the model gives none, and the lexicon search could finish the
    last word only by taking a space from a frame that held something else: it often dropped or
    swapped the word instead ("plan b" came out "plan"). Reference model: beam WER 1.33 → 0.63 % on
    valid, 1.47 → 0.97 % on test, FSDD 89.4 → 86.7 % (docs/decoding.md)."""
    batch, frames, classes = scores.shape
    out = scores.new_full((batch, frames + 1, classes), IMPOSSIBLE)
    out[:, :frames] = scores
    rows = torch.arange(batch)
    out[rows, lengths] = IMPOSSIBLE  # a padded batch's shorter rows had padding there
    out[rows, lengths, word_end] = 0.0
    return out, lengths + 1


def decoder_tokens(tokenizer: Tokenizer) -> list[str]:
    """The class ids' names in index order, as flashlight wants them."""
    names = list(tokenizer.alphabet) if tokenizer.unit == "bpe" else list(tokenizer.alphabet.replace(" ", SPACE_TOKEN))
    names.insert(tokenizer.blank, BLANK_TOKEN)
    return names


def bpe_lexicon(lexicon: Path, path: Path) -> Path:
    """The lm stage's lexicon (words spelled in BPE pieces), each spelling also with a blank after it.

    Flashlight ends a word on the frame of its last token and then may not repeat that token; the
    spelling that ends in a blank lets the last piece last several frames (held, then a blank), the
    other lets the next word follow without a blank between. A piece held and followed at once by
    the next word still pays one frame at the blank's score.
    """
    lines = [line for line in lexicon.read_text().splitlines() if line.strip()]
    path.write_text("".join(f"{line}\n{line} {BLANK_TOKEN}\n" for line in lines))
    return path


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds
    end: float
    confidence: float  # 0–1: the mean posterior of the word's aligned non-blank frames


def align_words(log_probs: torch.Tensor, text: str, tokenizer: Tokenizer, frame_seconds: float,
                blank_penalty: float) -> list[Word]:
    """Start, end and confidence of each word of `text` from its Viterbi CTC alignment to
    `log_probs` (frames, classes): a word runs from the first frame of its first unit to the last
    frame of its last unit. For a greedy hypothesis this is the best path itself."""
    return [Word(word, first * frame_seconds, end * frame_seconds, confidence)
            for word, first, end, confidence in aligned_words(log_probs, text, tokenizer, blank_penalty)]


def aligned_words(log_probs: torch.Tensor, text: str, tokenizer: Tokenizer,
                  blank_penalty: float) -> list[tuple[str, int, int, float]]:
    """(word, first frame, end frame (exclusive), confidence) for each word of `text`.

    The alignment is found with the blank penalty applied, as the decoders see the scores; the
    confidence is read from the model's own posteriors on that path: the mean posterior of the
    word's non-blank frames (the mean rather than the minimum: on the demo test split it puts more
    of the wrong words among the least confident, docs/decoding.md "Word confidence").
    Words are split at the space class (characters) or before each unit that starts a word
    (BPE pieces marked '▁', word units).
    """
    words = text.split()
    if not words:
        return []
    ids = tokenizer.encode(" ".join(words))
    log_probs = log_probs.detach().to("cpu", torch.float32)
    scores = penalize_blank(log_probs, tokenizer.blank, blank_penalty)
    path, _ = AF.forced_align(scores[None], torch.tensor([ids], dtype=torch.int32), blank=tokenizer.blank)
    posteriors = log_probs.gather(1, path[0][:, None].long())[:, 0].exp()
    spans = AF.merge_tokens(path[0], posteriors, blank=tokenizer.blank)
    separator = tokenizer.encode(" ") if tokenizer.unit == "char" else []
    groups: list[list] = []  # the spans of each word
    for span in spans:
        if [span.token] == separator:
            groups.append([])
        else:
            if not groups or tokenizer.starts_word(span.token):
                groups.append([])
            groups[-1].append(span)
    groups = [g for g in groups if g]
    return [(word, g[0].start, g[-1].end, float(torch.cat([posteriors[s.start:s.end] for s in g]).mean()))
            for word, g in zip(words, groups)]
