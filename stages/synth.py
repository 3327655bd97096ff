"""Stage synth: speak the built-in demo corpus with espeak-ng.

Sentences are drawn from a template grammar (synth.grammar, a small-vocabulary
voice-assistant task) and spoken by synthetic speakers. A speaker is one espeak voice
setting: an English dialect, a variant (m1, f3, klatt2, whisper, ...), and its own rate,
pitch, pitch range, word gap and intonation group. Each utterance also gets random pauses
between words and stressed words, through SSML, so its words stay the transcript's.
Each split may also get word lists (splits.<split>.word_lists): strings of 1–N words drawn
uniformly from the grammar's vocabulary, down to single words. Without them the model learns the
grammar as well as the sounds, and hears an isolated "six" as the first word of a command.
Train, valid and test use disjoint sets of espeak variants, and no valid or test sentence
occurs in train. Writes data/corpus/wav/<split>/<id>.wav (16-bit PCM mono) and
data/corpus/metadata.csv; the same params always give byte-identical files.
"""

from __future__ import annotations

import csv
import multiprocessing
import multiprocessing.connection
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import soundfile as sf
import torch
import torchaudio
from pydantic import AfterValidator, Field, field_validator, model_validator
from tqdm import tqdm

from ctcflow import espeak
from ctcflow.params import Int, ParamsError, Section, read_yaml
from stages.runner import StageError, stage_main

CORPUS_DIR = Path("data/corpus")
SPLITS = ("train", "valid", "test")
COLUMNS = (
    "id", "split", "path", "text", "speaker", "voice", "variant", "rate", "pitch", "pitch_range",
    "word_gap", "intonation", "ssml", "duration",
)

_PHRASE = re.compile(r"[a-z']+( [a-z']+)*")
_SLOT = re.compile(r"\{(\w+)\}")
_BREAK = re.compile(r'<break time="(\d+)ms"/>')


def Span(low: int, high: int, what: str):
    """A [low, high] pair inside low…high: the bounds of a random draw."""
    def check(v: tuple[int, int]) -> tuple[int, int]:
        if not low <= v[0] <= v[1] <= high:
            raise ValueError(f"need {low} <= low <= high <= {high} ({what})")
        return v
    return Annotated[tuple[Int, Int], AfterValidator(check)]


class SplitSize(Section):
    utterances: int = Field(gt=0)  # sentences of the grammar
    speakers: int = Field(gt=0)
    word_lists: int = Field(default=0, ge=0)  # extra utterances: random strings of vocabulary words

    @model_validator(mode="after")
    def _every_speaker_speaks(self):
        if self.speakers > self.utterances:
            raise ValueError(f"{self.speakers} speakers but only {self.utterances} utterances")
        return self


class Splits(Section):
    train: SplitSize
    valid: SplitSize
    test: SplitSize


class SynthParams(Section):
    seed: int
    grammar: Path
    max_words_per_slot: int = Field(ge=0)  # keep the first N entries of each slot; 0 = all
    sample_rate: int = Field(ge=8000, le=48000)
    voices: list[str] = Field(min_length=1)
    exclude_variants: list[str]
    # espeak clamps rates outside 80–450 and pitch settings above 99.
    rate_wpm: Span(80, 450, "words per minute")
    pitch: Span(0, 99, "espeak pitch")
    pitch_range: Span(0, 99, "espeak pitch range")
    word_gap: Span(0, 50, "tens of milliseconds")
    intonation: Span(0, 7, "espeak intonation group")
    break_probability: float = Field(ge=0, le=1)
    break_ms: Span(0, 2000, "milliseconds")
    emphasis_probability: float = Field(ge=0, le=1)
    word_list_words: Span(1, 20, "words per word list") = (1, 4)
    num_workers: int = Field(ge=1, le=64)
    splits: Splits

    @field_validator("voices")
    @classmethod
    def _known_voices(cls, v):
        unknown = sorted(set(name.lower() for name in v) - set(espeak.list_voices()))
        if unknown:
            raise ValueError(f"unknown espeak voices {unknown}")
        return v

    @field_validator("exclude_variants")
    @classmethod
    def _known_variants(cls, v):
        # A misspelt name would silently exclude nothing.
        unknown = sorted(set(v) - set(espeak.list_variants()))
        if unknown:
            raise ValueError(f"unknown espeak variants {unknown}")
        return v


@dataclass(frozen=True)
class Grammar:
    templates: list[str]
    slots: dict[str, list[str]]

    def sample(self, rng: random.Random) -> str:
        template = rng.choice(self.templates)
        return _SLOT.sub(lambda m: rng.choice(self.slots[m.group(1)]), template)

    def vocabulary(self) -> set[str]:
        words = {w for t in self.templates for w in _SLOT.sub(" ", t).split()}
        return words | {w for entries in self.slots.values() for e in entries for w in e.split()}


def load_grammar(path: Path, max_words_per_slot: int) -> Grammar:
    if not path.is_file():
        raise StageError(f"grammar file {path} not found (synth.grammar)")
    try:
        raw = read_yaml(path, "grammar file")
    except ParamsError as err:
        raise StageError(f"synth.grammar: {err}") from None
    templates, slots = (raw.get("templates"), raw.get("slots")) if isinstance(raw, dict) else (None, None)
    if (not templates or not isinstance(templates, list) or not all(isinstance(t, str) for t in templates)
            or not isinstance(slots, dict)):
        raise StageError(f"{path}: needs a 'templates' list of strings and a 'slots' mapping")
    for name, entries in slots.items():
        if entries is not None and not isinstance(entries, list):  # a string would give its letters
            raise StageError(
                f"{path}: slot '{name}' must be a list of phrases, got {type(entries).__name__} {entries!r}")
        bad = [e for e in entries or [None] if not isinstance(e, str) or not _PHRASE.fullmatch(e)]
        if bad:
            raise StageError(
                f"{path}: slot '{name}' is empty or has entries that are not lowercase a-z, ' and"
                f" single spaces: {bad} (YAML reads bare on/off/yes/no as booleans: quote them)"
            )
    cut = max_words_per_slot or None
    slots = {name: entries[:cut] for name, entries in slots.items()}
    used = set()
    for template in templates:
        refs = _SLOT.findall(template)
        if unknown := set(refs) - set(slots):
            raise StageError(
                f"{path}: template {template!r} uses undefined slots {sorted(unknown)}"
            )
        used.update(refs)
        # Literal text must already be a clean transcript: lowercase letters, ', single spaces.
        if not _PHRASE.fullmatch(_SLOT.sub("x", template)):
            raise StageError(f"{path}: template {template!r} may hold only a-z ' and space")
    if unused := set(slots) - used:
        raise StageError(f"{path}: slots {sorted(unused)} are used by no template")
    return Grammar(list(templates), slots)


def draw_sentences(grammar: Grammar, splits: Splits, seed: int) -> dict[str, list[str]]:
    """Held-out splits first, each with distinct sentences; train then avoids all of them.

    Each split has its own random stream, so resizing train leaves valid and test unchanged.
    """
    held_out: set[str] = set()
    out = {}
    for split in ("test", "valid", "train"):
        rng = random.Random(f"{seed}:sentences:{split}")
        n = getattr(splits, split).utterances
        chosen: list[str] = []
        seen: set[str] = set()
        attempts = 0
        while len(chosen) < n:
            attempts += 1
            if attempts > 100 * n + 1000:  # rejection sampling: the grammar is too small
                raise StageError(
                    f"the grammar gives too few distinct sentences for {split}"
                    f" ({len(chosen)} of {n}); use fewer utterances or a larger max_words_per_slot"
                )
            s = grammar.sample(rng)
            if s in held_out or (split != "train" and s in seen):
                continue
            chosen.append(s)
            seen.add(s)
        held_out |= seen
        out[split] = chosen
    return out


def draw_word_lists(grammar: Grammar, splits: Splits, seed: int, words: tuple[int, int],
                    sentences: dict[str, list[str]]) -> dict[str, list[str]]:
    """Random strings of vocabulary words, each split from its own stream; train gets no held-out transcript."""
    vocabulary = sorted(grammar.vocabulary())
    held_out = set(sentences["valid"]) | set(sentences["test"])
    out = {}
    for split in ("test", "valid", "train"):
        rng = random.Random(f"{seed}:word_lists:{split}")
        n = getattr(splits, split).word_lists
        chosen: list[str] = []
        attempts = 0
        while len(chosen) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise StageError(f"too few word lists for {split} ({len(chosen)} of {n}) avoid the held-out"
                                 " transcripts; use fewer, or a wider synth.word_list_words")
            text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(*words)))
            if split != "train" or text not in held_out:
                chosen.append(text)
        if split != "train":
            held_out |= set(chosen)
        out[split] = chosen
    return out


@dataclass(frozen=True)
class Speaker:
    split: str
    name: str
    voice: espeak.Voice


def draw_speakers(params: SynthParams) -> dict[str, list[Speaker]]:
    """Give each split its own espeak variants, then draw its speakers from them.

    Variants (m1, f3, klatt, ...) set most of a voice's timbre, so splitting variants, not
    just (dialect, variant) pairs, keeps valid and test voices truly unheard in training.
    Variants are shared out in proportion to each split's speakers, held-out splits first. So
    train's utterances and word lists leave valid and test as they were, but its speaker count
    moves the shares, and with them which voices valid and test get.
    """
    rng = random.Random(f"{params.seed}:speakers")
    variants = [v for v in espeak.list_variants() if v not in params.exclude_variants]
    rng.shuffle(variants)
    available = len(variants)
    wanted = {s: getattr(params.splits, s).speakers for s in SPLITS}
    total = sum(wanted.values())
    out = {}
    for split in ("test", "valid", "train"):
        share = len(variants) if split == "train" else max(1, round(len(variants) * wanted[split] / total))
        mine, variants = variants[:share], variants[share:]
        if not mine:  # fewer speakers would not help: no split may have none
            raise StageError(f"{split}: no espeak variant is left for it; each split needs its own, and the "
                             f"{available} that synth.exclude_variants leaves are used up: exclude fewer variants")
        pairs = [(voice, variant) for variant in mine for voice in params.voices]
        if wanted[split] > len(pairs):
            raise StageError(f"{split}: {wanted[split]} speakers wanted but its {len(mine)} variants "
                             f"give only {len(pairs)} (dialect, variant) pairs; ask for fewer speakers")
        rng.shuffle(pairs)
        out[split] = [
            Speaker(split, f"{split}-spk{i:04d}", espeak.Voice(
                voice, variant, rng.randint(*params.rate_wpm), rng.randint(*params.pitch),
                rng.randint(*params.pitch_range), rng.randint(*params.word_gap), rng.randint(*params.intonation)))
            for i, (voice, variant) in enumerate(pairs[: wanted[split]])
        ]
    return out


def add_prosody(text: str, params: SynthParams, rng: random.Random) -> str:
    """The sentence as SSML, with random pauses between words and random stressed words.

    Tags go only between and around whole words, so espeak speaks exactly the transcript.
    """
    marked = []
    for i, word in enumerate(text.split()):
        if i and rng.random() < params.break_probability:
            marked.append(f'<break time="{rng.randint(*params.break_ms)}ms"/>')
        marked.append(f"<emphasis>{word}</emphasis>" if rng.random() < params.emphasis_probability else word)
    return " ".join(marked)


Job = tuple[Speaker, list[tuple[str, str, str]], Path, int]  # speaker, (id, text, ssml)s, out_dir, rate


def _speak(job: Job) -> list[dict]:
    """Synthesize one speaker's utterances (runs in a freshly forked child, see run())."""
    spk, utterances, out_dir, sample_rate = job
    torch.set_num_threads(1)  # one process per core already; more threads only contend
    # The transform computes its sinc kernel once; functional.resample redoes it on every call.
    resample = torchaudio.transforms.Resample(espeak.initialize(), sample_rate)
    voice = spk.voice
    rows = []
    for utt_id, text, ssml in utterances:
        audio, _ = espeak.synthesize(ssml, voice, ssml=True)
        audio = resample(torch.from_numpy(audio)).numpy()
        seconds = len(audio) / sample_rate
        words = len(text.split())
        pauses = sum(int(ms) for ms in _BREAK.findall(ssml)) / 1000
        if np.abs(audio).max() < 0.01 or not 0.1 * words < seconds < 1.5 * words + 2 + pauses:
            raise StageError(
                f"{voice.name}+{voice.variant} gave {seconds:.2f} s of near-silence or of odd length"
                f" for {ssml!r}; add the variant to synth.exclude_variants"
            )
        pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)
        path = f"wav/{spk.split}/{utt_id}.wav"
        sf.write(out_dir / path, pcm, sample_rate, subtype="PCM_16")
        rows.append({
            "id": utt_id, "split": spk.split, "path": path, "text": text, "speaker": spk.name,
            "voice": voice.name, "variant": voice.variant, "rate": voice.rate, "pitch": voice.pitch,
            "pitch_range": voice.pitch_range, "word_gap": voice.word_gap, "intonation": voice.intonation,
            "ssml": ssml, "duration": f"{seconds:.3f}",
        })
    return rows


def _speak_and_send(job: Job, send: multiprocessing.connection.Connection) -> None:
    # A terminal's Ctrl-C reaches every child too: the stage reports it in one line, and its
    # children (daemons) end with it, each without a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        send.send(_speak(job))
    except StageError as err:
        send.send(err)


def speak_each_in_own_child(jobs: list[Job], num_workers: int):
    """Yield each job's rows, each job spoken in a child forked for it alone, num_workers at a time.

    Unlike a multiprocessing.Pool, which waits forever for a task whose worker died, this
    stops with a StageError when espeak crashes a child (it does, rarely, on some settings).
    """
    fork = multiprocessing.get_context("fork")
    waiting, running = iter(jobs), {}
    while True:
        while len(running) < num_workers and (job := next(waiting, None)):
            receive, send = fork.Pipe(duplex=False)
            child = fork.Process(target=_speak_and_send, args=(job, send), daemon=True)
            child.start()
            send.close()  # the child holds the other end: its exit makes recv() end
            running[receive] = (child, job[0])
        if not running:
            return
        for receive in multiprocessing.connection.wait(list(running)):
            child, spk = running.pop(receive)
            try:
                outcome = receive.recv()
            except EOFError:
                child.join()
                raise StageError(
                    f"espeak crashed (exit code {child.exitcode}) speaking {spk.name}, {spk.voice}; narrow "
                    f"synth.pitch and synth.pitch_range (a low pitch with a wide range is the known trigger), "
                    f"add {spk.voice.variant!r} to synth.exclude_variants, or change synth.seed"
                ) from None
            child.join()
            if isinstance(outcome, StageError):
                raise outcome
            yield outcome


def run(params: SynthParams, out_dir: Path = CORPUS_DIR) -> None:
    """Write the corpus to out_dir (wiped first).

    Call it from a process that has not spoken through ctcflow.espeak yet, as
    `python -m stages.synth` has not; otherwise the audio differs from the CLI's.
    """
    grammar = load_grammar(params.grammar, params.max_words_per_slot)
    sentences = draw_sentences(grammar, params.splits, params.seed)
    word_lists = draw_word_lists(grammar, params.splits, params.seed, params.word_list_words, sentences)
    speakers = draw_speakers(params)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    jobs = []
    for split in SPLITS:
        (out_dir / "wav" / split).mkdir(parents=True)
        # Word lists after the sentences: adding them leaves every sentence's audio as it was.
        texts, n = sentences[split] + word_lists[split], len(speakers[split])
        # Drawn here, in sentence order, so that the draws do not depend on num_workers.
        rng = random.Random(f"{params.seed}:prosody:{split}")
        spoken = [add_prosody(text, params, rng) for text in texts]
        for k, spk in enumerate(speakers[split]):
            # Utterance i goes to speaker i mod n, so every speaker gets an even share.
            utts = [(f"{spk.name}-{i:05d}", texts[i], spoken[i]) for i in range(k, len(texts), n)]
            jobs.append((spk, utts, out_dir, params.sample_rate))

    # espeak carries state (its pitch-flutter phase) from one sentence into the next, so a
    # sentence's samples depend on what the process spoke before. For byte-identical output
    # every speaker gets a fresh child forked from this process, whose espeak is initialised
    # but has never spoken; the result then does not depend on num_workers or scheduling.
    espeak.initialize()
    rows = []
    with tqdm(total=sum(len(j[1]) for j in jobs), desc="synth", unit="utt") as bar:
        for done in speak_each_in_own_child(jobs, params.num_workers):
            rows += done
            bar.update(len(done))

    rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["id"]))
    with open(out_dir / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        hours = sum(float(r["duration"]) for r in part) / 3600
        print(
            f"{split}: {len(part)} utterances, {len({r['speaker'] for r in part})} speakers, "
            f"{hours:.2f} h, {len({r['text'] for r in part})} distinct transcripts"
        )


def main(argv: list[str] | None = None) -> None:
    stage_main("synth", SynthParams, run, __doc__, argv)


if __name__ == "__main__":
    main()
