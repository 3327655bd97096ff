"""Beam search with a lexicon and a word n-gram LM: the LM estimator, the lm stage, and the
real flashlight decoder on constructed log-probabilities."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml

from conftest import frame_log_probs, merge, section, tiny_params, tiny_tokenizer, write_word_lm
from ctcflow.decoding import BeamParams, BeamSearchDecoder, GreedyDecoder
from ctcflow.lm import UNK, kneser_ney, read_arpa, read_lexicon, score, write_arpa, write_lexicon
from ctcflow.metrics import error_rates
from ctcflow.params import ParamsError, load_section
from stages.evaluate import EvaluateParams

TOKENIZER = tiny_tokenizer()
CORPUS = ["turn on the light", "turn off the light", "turn on the light in the kitchen",
          "the night is dark", "good night", "switch on the light please", "dim the light"]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_kneser_ney_distributions_sum_to_one(tmp_path, order):
    logprob, backoff = kneser_ney([s.split() for s in CORPUS], order)
    write_arpa(tmp_path / "lm.arpa", logprob, backoff)
    logprob, backoff = read_arpa(tmp_path / "lm.arpa")  # what KenLM reads
    vocabulary = [g[0] for g in logprob[0] if g[0] != "<s>"]
    assert UNK in vocabulary and "</s>" in vocabulary
    for history in [(), ("<s>",), ("the",), ("on", "the"), ("turn", "on"), ("never", "seen")]:
        total = sum(10 ** score(logprob, backoff, history, w) for w in vocabulary)
        assert total == pytest.approx(1.0, abs=1e-5), history
    if order > 1:  # context matters: "the light" is likelier than "the night"
        assert score(logprob, backoff, ("the",), "light") > score(logprob, backoff, ("the",), "night")


def test_lexicon_spells_each_word_once(tmp_path):
    write_lexicon(tmp_path / "lexicon.txt", ["light", "don't", "light"], TOKENIZER)
    assert (tmp_path / "lexicon.txt").read_text() == "don't\td o n ' t |\nlight\tl i g h t |\n"
    assert read_lexicon(tmp_path / "lexicon.txt") == ["don't", "light"]


def spell(text: str, confusions: dict[int, dict[str, float]]) -> torch.Tensor:
    """Log-probabilities that spell `text` one character per frame with a blank frame after each,
    except at character positions in `confusions`, whose frame gets the given distribution."""
    columns = []
    for i, ch in enumerate(text):
        columns += [confusions.get(i, {ch: 0.95}), {"blank": 0.95}]
    return frame_log_probs(TOKENIZER, *columns)


def beam(**settings) -> BeamParams:
    """evaluate.beam of the tiny project, with `settings` changed."""
    return section("evaluate", EvaluateParams, beam=settings).beam


@pytest.fixture
def lm_dir(tmp_path):
    return write_word_lm(tmp_path, CORPUS, TOKENIZER)


def test_the_language_model_fixes_what_the_acoustics_get_wrong(lm_dir):
    reference = "turn on the light"
    # The acoustics lean to "n" over "l" at the start of "light", and misspell its "g" as "q".
    log_probs = spell(reference, {12: {"n": 0.55, "l": 0.40}, 14: {"q": 0.6, "g": 0.35}})
    lengths = torch.tensor([log_probs.shape[1]])
    greedy = GreedyDecoder(TOKENIZER, blank_penalty=0.0)(log_probs, lengths)
    free = beam(lexicon=False, lm_weight=0.0).decoder(TOKENIZER, lm_dir, blank_penalty=0.0)(log_probs, lengths)
    lexicon = beam(lexicon=True, lm_weight=0.0).decoder(TOKENIZER, lm_dir, blank_penalty=0.0)(log_probs, lengths)
    with_lm = beam(lexicon=True, lm_weight=2.0).decoder(TOKENIZER, lm_dir, blank_penalty=0.0)(log_probs, lengths)
    assert greedy == free == ["turn on the niqht"]
    assert lexicon == ["turn on the night"]  # the lexicon fixes the spelling, not the word
    assert with_lm == [reference]  # the LM knows "the light" is what people say
    assert error_rates([reference], with_lm)["wer"] <= error_rates([reference], greedy)["wer"]


def test_a_word_lm_without_a_lexicon_is_refused(tmp_path):
    params = merge(tiny_params(), {"evaluate": {"beam": {"lexicon": False, "lm_weight": 1.0}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"evaluate.beam: Value error, lm_weight > 0 needs lexicon: true"):
        load_section("evaluate", EvaluateParams, tmp_path / "params.yaml")


def test_missing_lm_files_name_the_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the lm stage first"):
        beam(lexicon=True, lm_weight=2.0).decoder(TOKENIZER, tmp_path, blank_penalty=0.0)


def test_lm_stage_covers_the_training_words(tiny_pipeline):
    train = pd.read_json(tiny_pipeline / "data/manifests/train.jsonl", lines=True)
    words = {w for t in train["text_normalized"] for w in t.split()}
    assert set(read_lexicon(tiny_pipeline / "data/lm/lexicon.txt")) == words
    metrics = json.loads((tiny_pipeline / "metrics/lm.json").read_text())
    assert metrics["vocabulary"] == len(words) and metrics["sentences"] == len(train)
    assert 0 <= metrics["test_oov_rate"] <= 1


def test_evaluate_reports_greedy_and_beam_side_by_side(tiny_pipeline):
    metrics = json.loads((tiny_pipeline / "metrics/eval.json").read_text())
    assert {"wer", "cer", "sentence_accuracy"} <= set(metrics["greedy"]) and {"wer", "cer"} <= set(metrics["beam"])
    chosen = tiny_params()["evaluate"]["decoder"]
    assert metrics["wer"] == metrics[chosen]["wer"] and metrics["cer"] == metrics[chosen]["cer"]
    table = pd.read_csv(tiny_pipeline / "reports/eval/utterances.csv", keep_default_na=False)
    assert (table["hypothesis"] == table[f"hypothesis_{chosen}"]).all()
    assert error_rates(table["reference"].tolist(), table["hypothesis_greedy"].tolist())["wer"] == \
        pytest.approx(metrics["greedy"]["wer"])


def test_the_last_word_of_an_utterance_is_kept(tmp_path):
    # The model gives no space after the last word (transcripts have none), and the lexicon search
    # ends a word on its spelling's space: it had to take one from a frame that held something else,
    # and dropped a one-letter last word instead ("plan b" came out "plan"; "plan b" mid-sentence was
    # always kept, a space frame following it).
    tokenizer = tiny_tokenizer()
    lm_dir = write_word_lm(tmp_path, ["plan b", "plan a", "a plan", "turn on"], tokenizer)

    def spoken(text: str) -> list[dict]:  # each unit's frame, then a blank's
        return [column for unit in text for column in ({unit: 0.95}, {"blank": 0.95})]

    for lm in (lm_dir / "lm.arpa", None):
        decoder = BeamSearchDecoder(tokenizer, 10, 25.0, lm_dir / "lexicon.txt", lm, lm_weight=2.0 if lm else 0.0,
                                    word_score=1.0 if lm else 0.0, blank_penalty=0.0)
        for text in ("plan b", "plan a", "turn on"):
            frames = spoken(text)
            assert decoder(frame_log_probs(tokenizer, *frames), torch.tensor([len(frames)])) == [text]
        # In a padded batch each utterance gets its word end after its own frames.
        short, long = spoken("plan a"), spoken("turn on")
        padded = torch.cat([frame_log_probs(tokenizer, *short, *[{"blank": 0.95}] * 2),
                            frame_log_probs(tokenizer, *long)])
        assert decoder(padded, torch.tensor([len(short), len(long)])) == ["plan a", "turn on"]
