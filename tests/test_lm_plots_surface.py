"""The lm stage, the plots stage and `ctcflow summary` on odd inputs, as an ML engineer meets them:
a unigram LM, transcripts the LM or lexicon cannot hold, test error rates above every validation
epoch, hand-made metrics files."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import matplotlib.figure
import pytest
import torch

from conftest import frame_log_probs, run_ctcflow, tiny_tokenizer
from ctcflow.decoding import BeamSearchDecoder
from ctcflow.lm import kneser_ney, write_arpa, write_lexicon
from ctcflow.text import RECIPE_ALPHABET, Tokenizer, train_bpe
from stages import lm, plots

TOKENIZER = tiny_tokenizer()


# --- the lm stage -------------------------------------------------------------------------------

UNIGRAM_ARPA = """
\\data\\
ngram 1=5
ngram 2=0

\\1-grams:
-0.535113\t</s>
-99.000000\t<s>
-0.903090\t<unk>
-0.535113\ta
-0.535113\tb

\\2-grams:

\\end\\
"""


def test_a_unigram_lm_is_written_in_a_form_kenlm_reads(tmp_path):
    # Was: "ngram 1=5" alone, which KenLM refuses ("assumes at least a bigram model"): lm.order 1
    # passed the lm stage and evaluate's beam search stopped with a RuntimeError traceback.
    # By hand: a, b and </s> seen once, D = 0.5 (n2 = 0), gamma = 0.5 * 3 / 3, 4 words with <unk>:
    # p(a) = 0.5 / 3 + 0.5 / 4 = 0.291667 (log10 -0.535113), p(<unk>) = 0.125 (log10 -0.903090).
    logprob, backoff = kneser_ney([["a", "b"]], 1)
    write_arpa(tmp_path / "lm.arpa", logprob, backoff)
    assert (tmp_path / "lm.arpa").read_text() == UNIGRAM_ARPA
    # And the beam search reads a unigram LM (lm.order 1) of the lm stage.
    corpus = [["turn", "on", "the", "light"], ["good", "night"]]
    write_arpa(tmp_path / "lm.arpa", *kneser_ney(corpus, 1))
    write_lexicon(tmp_path / "lexicon.txt", [w for words in corpus for w in words], TOKENIZER)
    decoder = BeamSearchDecoder(TOKENIZER, 10, 25.0, tmp_path / "lexicon.txt", tmp_path / "lm.arpa",
                                lm_weight=2.0, word_score=1.0, blank_penalty=0.0)
    frames = [column for ch in "good night" for column in ({ch: 0.95}, {"blank": 0.95})]
    assert decoder(frame_log_probs(TOKENIZER, *frames), torch.tensor([len(frames)])) == ["good night"]


def test_higher_orders_are_written_as_before(tmp_path):
    # The unigram fix touches nothing else. A bigram of "a b", by hand: each bigram seen once,
    # D = 0.5, p(b | a) = 0.5 / 1 + 0.5 * p(b) = 0.5 + 0.5 * 0.291667 = 0.645833 (log10 -0.189880).
    logprob, backoff = kneser_ney([["a", "b"]], 2)
    write_arpa(tmp_path / "lm.arpa", logprob, backoff)
    text = (tmp_path / "lm.arpa").read_text()
    assert text.startswith("\n\\data\\\nngram 1=5\nngram 2=3\n\n\\1-grams:\n")
    assert text.endswith("\\2-grams:\n-0.189880\t<s> a\n-0.189880\ta b\n-0.189880\tb </s>\n\n\\end\\\n")


def manifests(root: Path, train: list[str], tokenizer: Tokenizer = TOKENIZER) -> Path:
    """data/manifests with train.jsonl holding `train` and tokens.json of `tokenizer`, as the manifest
    stage writes them."""
    directory = root / "data" / "manifests"
    directory.mkdir(parents=True)
    rows = [{"id": str(i), "audio_path": f"{i}.wav", "duration": 1.0, "sample_rate": 16000, "num_channels": 1,
             "text": text, "text_normalized": text, "speaker": "s", "split": "train"} for i, text in enumerate(train)]
    (directory / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "tokens.json").write_text(json.dumps(tokenizer.units_dict()))
    (root / "params.yaml").write_text("lm:\n  order: 3\n")
    return root


def lm_stage(root: Path) -> str:
    """`ctcflow lm` in `root`: its one-line error, or "" where it succeeded."""
    with contextlib.chdir(root):
        try:
            lm.main(["--params", "params.yaml"])
        except SystemExit as exit:
            return str(exit.code)
    return ""


def test_words_the_beam_search_cannot_spell_stop_the_lm_stage(tmp_path):
    # Was: a lexicon with "héllo" spelled h é l l o, then evaluate's beam search stopped with
    # flashlight's ValueError traceback "Unknown entry in dictionary: 'é'".
    manifests(tmp_path, ["héllo world", "w0rld"])
    assert lm_stage(tmp_path) == (
        "ctcflow lm: error: data/manifests/train.jsonl: 2 word(s) with units outside data/manifests/tokens.json: "
        "'héllo' (é), 'w0rld' (0); the beam search could not spell them (rerun the manifest stage, "
        "which checks transcripts against the alphabet)")
    assert not (tmp_path / "data/lm").exists()


@pytest.mark.parametrize("text, marks", [("a <s> b", "<s>"), ("a </s> b", "</s>")])
def test_the_arpa_sentence_marks_in_a_transcript_stop_the_lm_stage(tmp_path, text, marks):
    # Was: "<s>" a KeyError traceback from kneser_ney; "</s>" an LM that ends sentences mid-sentence, silently.
    tokenizer = Tokenizer(RECIPE_ALPHABET + "<>/", "last", "char")
    manifests(tmp_path, [text], tokenizer)
    assert lm_stage(tmp_path) == (f"ctcflow lm: error: data/manifests/train.jsonl: the transcripts hold {marks}, "
                                  f"which the ARPA language model reserves for the start and end of a sentence")


def test_bpe_words_pass_the_spelling_check(tmp_path):
    corpus = ["turn on the light", "turn off the light", "the night is dark", "good night"]
    tokenizer = Tokenizer.from_bpe_model(train_bpe(corpus, 40, RECIPE_ALPHABET), "last")
    manifests(tmp_path, corpus, tokenizer)
    assert lm_stage(tmp_path) == ""
    words = (tmp_path / "data/lm/lexicon.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in words] == ["dark", "good", "is", "light", "night", "off", "on", "the",
                                                       "turn"]


# --- the plots stage ----------------------------------------------------------------------------

SERIES = ("train/loss", "train/ctc_loss", "train/blank_penalty", "valid/loss", "valid/wer", "valid/cer",
          "train/blank_ratio", "valid/blank_ratio")  # what train logs each epoch, and plots draws


def history(root: Path, wer: list[float]) -> Path:
    """dvclive's per-epoch TSVs of every series plots draws; valid/wer = `wer`, valid/cer half of it."""
    directory = root / "history"
    for name in SERIES:
        values = wer if name == "valid/wer" else [w / 2 for w in wer] if name == "valid/cer" else [0.5] * len(wer)
        path = directory / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"step\t{name.split('/')[1]}\n" + "".join(f"{i + 1}\t{v}\n" for i, v in enumerate(values)))
    return directory


def run_plots(root: Path, wer: list[float], metrics: dict, monkeypatch) -> dict[str, tuple]:
    """The plots stage on a history and eval.json; the y limits of each figure's first axes, by file name."""
    limits = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, **kwargs):
        limits[Path(path).name] = fig.axes[0].get_ylim()
        return save(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    (root / "eval.json").write_text(json.dumps(metrics))
    (root / "words.csv").write_text("id,word,first_frame,end_frame,confidence,correct\nu,a,0,1,0.9,True\n")
    plots.run(plots.PlotsParams(dpi=50), history(root, wer), root / "eval.json", root / "plots", root / "words.csv")
    return limits


def test_the_test_lines_stay_on_the_error_rate_chart(tmp_path, monkeypatch):
    # One epoch, test WER above its validation WER: the chart ended at 0.4 * 1.05 + 0.01 = 0.43
    # and the dashed test WER line at 0.6 was drawn off it.
    limits = run_plots(tmp_path, [0.4], {"wer": 0.6, "cer": 0.2}, monkeypatch)
    assert limits["error_rates.png"] == pytest.approx((0.0, 0.6 * 1.05 + 0.01))


def test_the_error_rate_chart_is_unchanged_where_validation_is_highest(tmp_path, monkeypatch):
    limits = run_plots(tmp_path, [0.5, 0.3], {"wer": 0.1, "cer": 0.05}, monkeypatch)
    assert limits["error_rates.png"] == pytest.approx((0.0, 0.5 * 1.05 + 0.01))
    limits = run_plots(tmp_path, [1.0, 0.3], {"wer": 0.1, "cer": 0.05}, monkeypatch)
    assert limits["error_rates.png"] == pytest.approx((0.0, 1.0))  # all blanks at first: capped at 1


def test_error_rates_above_one_are_on_the_chart(tmp_path, monkeypatch):
    # Insertions take WER over 100 % (the FSDD recipe's first row: 110.5 %); the chart stopped at 1.
    limits = run_plots(tmp_path, [1.2, 0.5], {"wer": 0.4, "cer": 0.2}, monkeypatch)
    assert limits["error_rates.png"] == pytest.approx((0.0, 1.2 * 1.05 + 0.01))


def test_metrics_that_are_not_evaluate_s_are_one_line(tmp_path, monkeypatch):
    # Was: KeyError 'wer' traceback (metrics/lm.json, say, given as eval.json).
    with pytest.raises(plots.StageError, match=r"eval.json has no top-level 'wer' and 'cer': not the evaluate "):
        run_plots(tmp_path, [0.5], {"vocabulary": 3}, monkeypatch)


def test_a_history_without_a_series_is_one_line(tmp_path, monkeypatch):
    # Was: KeyError 'train/blank_penalty' traceback.
    (tmp_path / "eval.json").write_text(json.dumps({"wer": 0.1, "cer": 0.05}))
    directory = history(tmp_path, [0.5])
    (directory / "train/blank_penalty.tsv").unlink()
    with pytest.raises(plots.StageError, match=r"history under .* lacks train/blank_penalty: not what the train"):
        plots.run(plots.PlotsParams(dpi=50), directory, tmp_path / "eval.json", tmp_path / "plots",
                  tmp_path / "words.csv")


# --- ctcflow summary ----------------------------------------------------------------------------

GREEDY = {"wer": 0.1, "cer": 0.05}


@pytest.mark.parametrize("test_sets, reason", [
    ([], "TypeError: 'test_sets' is a list, not a mapping of test sets"),  # was an AttributeError traceback
    (None, "TypeError: 'test_sets' is a NoneType, not a mapping of test sets"),
    ({"festival": {"wer": 0.5}}, "ValueError: test set 'festival' has no 'greedy' or 'beam' block"),  # was left out
])
def test_summary_of_odd_test_sets_is_one_line(tmp_path, capsys, test_sets, reason):
    (tmp_path / "eval.json").write_text(json.dumps({"greedy": GREEDY, "test_sets": test_sets}))
    code, out, err = run_ctcflow(capsys, "summary", "--metrics", str(tmp_path / "eval.json"),
                                 "--params", str(tmp_path / "none.yaml"))
    assert (code, out) == (1, "")
    assert err == f"ctcflow summary: error: {tmp_path / 'eval.json'} is not the evaluate stage's metrics ({reason})\n"


def test_summary_prints_each_test_set(tmp_path, capsys):
    metrics = {"greedy": GREEDY, "test_sets": {"festival": {"greedy": {"wer": 0.5, "cer": 0.25}}}}
    (tmp_path / "eval.json").write_text(json.dumps(metrics))
    code, out, _ = run_ctcflow(capsys, "summary", "--metrics", str(tmp_path / "eval.json"),
                               "--params", str(tmp_path / "none.yaml"))
    assert (code, out) == (0, "test WER 10.00%  CER  5.00%  greedy decoding\n"
                              "test set festival: WER 50.00%  CER 25.00%  greedy decoding\n"
                              "plots: plots/*.png, or all of them in one HTML page: dvc plots show\n")
