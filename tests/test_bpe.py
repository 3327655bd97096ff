"""BPE units: the sentencepiece model, the Tokenizer over its pieces, the manifest and lm stages
with units bpe, and greedy, beam and word alignment over pieces on constructed log-probabilities."""

from __future__ import annotations

import base64
import contextlib
import json

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from conftest import section, write_word_lm
from ctcflow.checkpoint import load_checkpoint, save_checkpoint
from ctcflow.decoding import BeamSearchDecoder, GreedyDecoder, align_words
from ctcflow.lm import read_lexicon
from ctcflow.manifest import read_manifest
from ctcflow.text import RECIPE_ALPHABET, Tokenizer, bpe_min_vocab_size, train_bpe
from stages import evaluate, featurize, lm, manifest, train

CORPUS = ["turn on the light", "turn off the light", "turn on the light in the kitchen", "the night is dark",
          "good night", "switch on the light please", "dim the light", "it's dark in the kitchen"] * 5
TOKENIZER = Tokenizer.from_bpe_model(train_bpe(CORPUS, 40, RECIPE_ALPHABET), "last")
PIECE_ID = {piece: i for i, piece in enumerate(TOKENIZER.alphabet)}  # the blank is last


def test_training_is_deterministic_and_keeps_to_the_vocabulary_size():
    model = train_bpe(CORPUS, 40, RECIPE_ALPHABET)
    assert model == train_bpe(CORPUS, 40, RECIPE_ALPHABET)
    assert len(TOKENIZER.alphabet) <= 40 - 1  # <unk> is no class
    assert TOKENIZER.num_classes == len(TOKENIZER.alphabet) + 1 and TOKENIZER.blank == len(TOKENIZER.alphabet)
    assert train_bpe(CORPUS, 60, RECIPE_ALPHABET) != model


@pytest.mark.parametrize("alphabet, least", [(RECIPE_ALPHABET, 29), ("abc", 5), ("' abc", 6)])
def test_the_least_vocabulary_size_is_sentencepiece_s(alphabet, least):
    """Each character but the space, plus '▁' and <unk>: the size the manifest's params check asks for,
    so a smaller one is refused before any header is read, not by sentencepiece after all of them."""
    assert bpe_min_vocab_size(alphabet) == least
    assert train_bpe(["a b", "abc ab", "c"], least, alphabet)
    with pytest.raises(RuntimeError, match="Vocabulary size is smaller than required_chars"):
        train_bpe(["a b", "abc ab", "c"], least - 1, alphabet)
    with pytest.raises(ValidationError, match=f"bpe_vocab_size: {least - 1} is below {least}, the least for units bpe"):
        section("manifest", manifest.ManifestParams, units="bpe", alphabet=alphabet, bpe_vocab_size=least - 1)
    section("manifest", manifest.ManifestParams, units="bpe", alphabet=alphabet, bpe_vocab_size=least)


def test_round_trip_text_ids_text():
    for text in [*CORPUS, "zebra quiz", "x", "it's"]:  # words never seen, spelled in single characters
        ids = TOKENIZER.encode(text)
        assert TOKENIZER.blank not in ids
        assert TOKENIZER.decode(ids) == text
    assert len(TOKENIZER.encode("turn on the light")) < len("turn on the light")  # pieces, not characters


def test_every_alphabet_character_is_a_piece_and_others_are_unknown():
    assert {ch for ch in RECIPE_ALPHABET if ch != " "} <= set(TOKENIZER.alphabet) | {p[1:] for p in TOKENIZER.alphabet}
    assert TOKENIZER.unknown("the Light!") == {"L", "!"}
    with pytest.raises(ValueError, match="outside the alphabet"):
        TOKENIZER.encode("é")


@pytest.mark.parametrize("blank", ["first", 5, "last"])
def test_the_blank_index_still_works(blank):
    tokenizer = Tokenizer(TOKENIZER.alphabet, blank, "bpe", TOKENIZER.bpe_model)
    ids = tokenizer.encode("turn on the light")
    assert tokenizer.blank not in ids and tokenizer.decode(ids) == "turn on the light"


def test_the_model_survives_tokens_json_and_a_weights_only_checkpoint(tmp_path):
    (tmp_path / "tokens.json").write_text(json.dumps(TOKENIZER.units_dict()))
    assert Tokenizer.load(tmp_path, blank="last") == TOKENIZER
    save_checkpoint(tmp_path / "model.pt", tokenizer=TOKENIZER.to_dict())
    assert Tokenizer(**load_checkpoint(tmp_path / "model.pt")["tokenizer"]) == TOKENIZER
    with pytest.raises(ValueError, match="only with them"):
        Tokenizer(RECIPE_ALPHABET, "last", "char", TOKENIZER.bpe_model)


@pytest.fixture(scope="module")
def bpe_project(tiny_pipeline, tmp_path_factory):
    """The tiny project's stages again with units bpe (50 pieces at most), the blank last."""
    root = tmp_path_factory.mktemp("bpe")
    with contextlib.chdir(tiny_pipeline):  # the manifests name the audio relative to the project root
        manifest.run(section("manifest", manifest.ManifestParams, units="bpe", bpe_vocab_size=50),
                     out_dir=root / "data/manifests", metrics_file=root / "metrics/manifest.json")
        featurize.run(section("featurize", featurize.FeaturizeParams), manifest_dir=root / "data/manifests",
                      out_dir=root / "data/features", metrics_file=root / "metrics/featurize.json")
    lm.run(section("lm", lm.LmParams), manifest_dir=root / "data/manifests", out_dir=root / "data/lm",
           metrics_file=root / "metrics/lm.json")
    train.run(section("train", train.TrainParams, ctc={"blank": "last"}), features_dir=root / "data/features",
              model_dir=root / "models", live_dir=root / "metrics/train")
    evaluate.run(section("evaluate", evaluate.EvaluateParams), features_dir=root / "data/features",
                 model_dir=root / "models", report_dir=root / "reports/eval", metrics_file=root / "metrics/eval.json",
                 lm_dir=root / "data/lm")
    return root


def test_manifest_and_lm_stages_with_bpe_units(tiny_pipeline, bpe_project):
    manifests = bpe_project / "data/manifests"
    units = json.loads((manifests / "tokens.json").read_text())
    assert units["unit"] == "bpe" and len(units["alphabet"]) <= 49
    model = (manifests / "bpe.model").read_bytes()
    assert base64.b64decode(units["bpe_model"]) == model
    # The same transcripts as with characters (the char project's own manifests), and the model
    # is the one trained on its training split.
    for split in ("train", "valid", "test"):
        assert read_manifest(manifests / f"{split}.jsonl").equals(read_manifest(tiny_pipeline / f"data/manifests/{split}.jsonl"))
    train_texts = read_manifest(manifests / "train.jsonl")["text_normalized"].tolist()
    assert model == train_bpe(train_texts, 50, section("manifest", manifest.ManifestParams).alphabet)
    tokenizer = Tokenizer.load(manifests, blank="last")
    assert all(tokenizer.decode(tokenizer.encode(t)) == t for t in train_texts)
    lexicon = (bpe_project / "data/lm/lexicon.txt").read_text().splitlines()
    assert lexicon and all(line.split("\t")[1].split() == tokenizer.units(line.split("\t")[0]) for line in lexicon)


def test_train_and_evaluate_with_bpe_units(bpe_project):
    checkpoint = load_checkpoint(bpe_project / "models/best.pt")  # weights_only=True
    tokenizer = Tokenizer.load(bpe_project / "data/features", blank="last")
    assert Tokenizer(**checkpoint["tokenizer"]) == tokenizer and tokenizer.unit == "bpe"
    metrics = json.loads((bpe_project / "metrics/eval.json").read_text())
    assert {"greedy", "beam", "confidence"} <= set(metrics) and metrics["utterances"] == 6
    table = pd.read_csv(bpe_project / "reports/eval/utterances.csv", keep_default_na=False)
    lexicon = set(read_lexicon(bpe_project / "data/lm/lexicon.txt"))
    assert " ".join(table["hypothesis_beam"]).split()  # the tiny model says something
    assert all(set(h.split()) <= lexicon for h in table["hypothesis_beam"])  # beam kept to lexicon words
    words = pd.read_csv(bpe_project / "reports/eval/words.csv", keep_default_na=False)
    assert words["word"].tolist() == [w for h in table["hypothesis"] for w in h.split()]


# ---- decoding over pieces, on constructed log-probabilities

def piece_frames(*frames: str | dict[str, float]) -> torch.Tensor:
    """(1, frames, classes) log-probabilities: a piece (or "blank") at 0.95 per frame, or a dict
    {piece or "blank": probability}; the rest of each frame's mass spread thin."""
    out = torch.full((1, len(frames), TOKENIZER.num_classes), 1e-4)
    for t, frame in enumerate(frames):
        for name, p in ({frame: 0.95} if isinstance(frame, str) else frame).items():
            out[0, t, TOKENIZER.blank if name == "blank" else PIECE_ID[name]] = p
    return (out / out.sum(-1, keepdim=True)).log()


def spelled(text: str, hold: int = 1) -> list[str]:
    """The pieces of `text`, each held `hold` frames and followed by a blank frame."""
    return [frame for piece in TOKENIZER.units(text) for frame in [piece] * hold + ["blank"]]


def test_greedy_and_lexicon_free_beam_join_pieces_into_words():
    log_probs = piece_frames(*spelled("turn on the light in the kitchen"))
    lengths = torch.tensor([log_probs.shape[1]])
    assert GreedyDecoder(TOKENIZER, blank_penalty=0.0)(log_probs, lengths) == ["turn on the light in the kitchen"]
    free = BeamSearchDecoder(TOKENIZER, beam_size=20, beam_threshold=25.0, lexicon=None, lm=None, lm_weight=0.0,
                             word_score=0.0, blank_penalty=0.0)
    assert free(log_probs, lengths) == ["turn on the light in the kitchen"]


@pytest.fixture
def lm_dir(tmp_path):
    return write_word_lm(tmp_path, CORPUS, TOKENIZER)


def beam_with_lexicon(lm_dir, lm_weight: float) -> BeamSearchDecoder:
    return BeamSearchDecoder(TOKENIZER, beam_size=50, beam_threshold=25.0, lexicon=lm_dir / "lexicon.txt",
                             lm=lm_dir / "lm.arpa" if lm_weight else None, lm_weight=lm_weight, word_score=0.0,
                             blank_penalty=0.0)


def test_the_bpe_lexicon_spells_words_in_pieces(lm_dir):
    assert read_lexicon(lm_dir / "lexicon.txt") == sorted({w for s in CORPUS for w in s.split()})
    line = next(x for x in (lm_dir / "lexicon.txt").read_text().splitlines() if x.startswith("kitchen\t"))
    assert line == "kitchen\t" + " ".join(TOKENIZER.units("kitchen"))


@pytest.mark.parametrize("hold", [1, 3])  # the last piece of each word held one frame, or three
def test_lexicon_beam_reads_words_whose_pieces_last_several_frames(lm_dir, hold):
    text = "turn on the light in the kitchen"
    log_probs = piece_frames(*spelled(text, hold))
    assert beam_with_lexicon(lm_dir, 0.0)(log_probs, torch.tensor([log_probs.shape[1]])) == [text]
    # Without blanks between words: each word's pieces run straight into the next word's.
    straight = piece_frames(*[p for p in TOKENIZER.units(text)])
    assert beam_with_lexicon(lm_dir, 0.0)(straight, torch.tensor([straight.shape[1]])) == [text]


def test_the_lexicon_and_lm_fix_a_misheard_piece(lm_dir):
    # "dim the light" whose "i" piece the acoustics hear as "u": "dum" is no word of the lexicon.
    dim = TOKENIZER.units("dim")
    assert "i" in dim and "u" in TOKENIZER.alphabet
    frames = [f for piece in dim for f in ({"u": 0.55, "i": 0.4} if piece == "i" else piece, "blank")]
    log_probs = piece_frames(*frames, *spelled("the light"))
    lengths = torch.tensor([log_probs.shape[1]])
    assert GreedyDecoder(TOKENIZER, blank_penalty=0.0)(log_probs, lengths) == ["dum the light"]
    assert beam_with_lexicon(lm_dir, 0.0)(log_probs, lengths) == ["dim the light"]
    assert beam_with_lexicon(lm_dir, 2.0)(log_probs, lengths) == ["dim the light"]


def test_words_are_timed_from_word_start_pieces():
    # "the kitchen": its pieces one frame each with a blank after, so word k spans known frames.
    pieces = TOKENIZER.units("the kitchen")
    log_probs = piece_frames(*spelled("the kitchen"))[0]
    words = align_words(log_probs, "the kitchen", TOKENIZER, frame_seconds=0.03, blank_penalty=0.0)
    first = len(TOKENIZER.units("the"))
    assert [w.word for w in words] == ["the", "kitchen"]
    assert [(round(w.start, 3), round(w.end, 3)) for w in words] == [
        (0.0, round(0.03 * (2 * first - 1), 3)), (round(0.03 * 2 * first, 3), round(0.03 * (2 * len(pieces) - 1), 3))]
    posterior = 0.95 / (0.95 + 1e-4 * (TOKENIZER.num_classes - 1))  # each piece frame's, after normalizing
    assert [w.confidence for w in words] == pytest.approx([posterior, posterior])
