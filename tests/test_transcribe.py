"""Transcription of audio files with a model trained in the tests (the tiny pipeline's)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
import torch
import torchaudio.functional as AF

from conftest import REPO, run_ctcflow
from ctcflow.audio import AudioError, decode_audio
from ctcflow.data import FeatureSplit
from ctcflow.decoding import Word
from ctcflow.transcribe import Transcriber, merge_words

# One epoch on 30 utterances leaves the tiny model blank-heavy; a decode-time blank penalty
# makes it emit characters, so there are words to time and to count.
PENALTY = 4.0


def test_utterances(root: Path) -> pd.DataFrame:
    return pd.read_json(root / "data/manifests/test.jsonl", lines=True)


test_utterances.__test__ = False  # a helper, not a test


def transcriber(root: Path, **options) -> Transcriber:
    """Greedy decoding with the blank penalty; 30 s windows overlapping by 4 s, 8 to a batch, unless told."""
    settings = dict(decoder="greedy", beam=None, lm_dir=None, blank_penalty=PENALTY, device="cpu",
                    chunk_seconds=30.0, overlap_seconds=4.0, batch_size=8, num_threads=None)
    return Transcriber(root / "models/best.pt", **{**settings, **options})


def check_words(transcript, duration: float) -> None:
    assert transcript.text == " ".join(w.word for w in transcript.words)
    assert transcript.duration == pytest.approx(duration, abs=1e-3)
    middles = [(w.start + w.end) / 2 for w in transcript.words]
    assert middles == sorted(middles) and len(set(middles)) == len(middles)  # in order, none twice
    for w in transcript.words:
        assert 0 <= w.start < w.end <= duration + 1e-6 and " " not in w.word and w.word


def test_transcribes_a_synthesized_utterance_with_features_as_featurize_made_them(tiny_pipeline):
    utt = test_utterances(tiny_pipeline).iloc[0]
    model = transcriber(tiny_pipeline)
    [transcript] = model.transcribe([tiny_pipeline / utt.audio_path])
    assert transcript.words, "the blank penalty should make the tiny model emit something"
    check_words(transcript, soundfile.info(str(tiny_pipeline / utt.audio_path)).duration)
    stored = FeatureSplit(tiny_pipeline / "data/features", "test", model.tokenizer)
    row = stored.index.index[stored.index["id"] == utt.id][0]
    ours = model.features(decode_audio(tiny_pipeline / utt.audio_path, model.config.sample_rate).waveform)
    assert torch.allclose(ours, stored[row][0], atol=0.02)  # the store holds float16


def test_any_sample_rate_and_channel_count(tiny_pipeline, tmp_path):
    utt = test_utterances(tiny_pipeline).iloc[1]
    samples, rate = soundfile.read(tiny_pipeline / utt.audio_path, dtype="float32")
    stereo = AF.resample(torch.from_numpy(samples), rate, 44100).numpy()
    soundfile.write(tmp_path / "stereo.flac", np.stack([stereo, 0.5 * stereo], axis=1), 44100)
    [transcript] = transcriber(tiny_pipeline).transcribe([tmp_path / "stereo.flac"])
    check_words(transcript, len(stereo) / 44100)


def test_a_rate_sharing_no_factor_with_the_model_s_resamples_as_featurize_does(tiny_pipeline, tmp_path):
    # 44,101 Hz: torchaudio's kernel for it would be 7 × 10**8 taps (12 GB); decode_audio's bounded
    # resample builds another, and transcribe must hear what featurize hears.
    utt = test_utterances(tiny_pipeline).iloc[1]
    samples, rate = soundfile.read(tiny_pipeline / utt.audio_path, dtype="float32")
    soundfile.write(tmp_path / "odd.wav", AF.resample(torch.from_numpy(samples), rate, 44100).numpy(), 44101,
                    subtype="FLOAT")
    model = transcriber(tiny_pipeline)
    [window] = list(model._windows([str(tmp_path / "odd.wav")]))
    assert torch.equal(window.waveform, decode_audio(tmp_path / "odd.wav", model.config.sample_rate).waveform)


def test_float_samples_beyond_any_audio_scale_are_refused_as_featurize_refuses_them(tiny_pipeline, tmp_path):
    soundfile.write(tmp_path / "huge.wav", np.full(16000, 3e9, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"huge.wav: peak sample 3e\+09 is beyond any audio scale \(> 2\*\*31\)"):
        list(transcriber(tiny_pipeline).transcribe([tmp_path / "huge.wav"]))


def test_batches_keep_the_order_and_the_results_of_one_file_at_a_time(tiny_pipeline):
    paths = [tiny_pipeline / p for p in test_utterances(tiny_pipeline)["audio_path"][:5]]
    batched = list(transcriber(tiny_pipeline, batch_size=2).transcribe(paths))
    alone = [next(transcriber(tiny_pipeline, batch_size=1).transcribe([p])) for p in paths]
    assert [t.path for t in batched] == [str(p) for p in paths]
    assert [t.text for t in batched] == [t.text for t in alone]


def test_a_long_file_is_read_in_overlapping_windows(tiny_pipeline, tmp_path):
    # ~30 s of speech in 5 s windows: words at the window borders must be kept exactly once.
    pieces = [soundfile.read(tiny_pipeline / p, dtype="float32")[0] for p in test_utterances(tiny_pipeline)["audio_path"]]
    gap = np.zeros(3200, dtype=np.float32)
    audio = np.concatenate([x for piece in pieces * 3 for x in (piece, gap)])
    soundfile.write(tmp_path / "long.wav", audio, 16000)
    [transcript] = transcriber(tiny_pipeline, chunk_seconds=5.0, overlap_seconds=1.5).transcribe([tmp_path / "long.wav"])
    check_words(transcript, len(audio) / 16000)
    assert transcript.words[-1].start > len(audio) / 16000 - 5.0  # the last window was decoded too


def word(text: str, start: float, end: float) -> Word:
    return Word(text, start, end, 0.9)


def test_a_word_at_a_border_is_kept_once_however_each_window_aligns_it():
    # Seen on the demo model: 30 s windows overlapping by 2 s, border at 85.0. The earlier window
    # aligned "dining" at 84.83–85.22 (midpoint 85.025, after the border), the later one at
    # 84.81–85.17 (84.99, before it): each left it to the other. "room" is the other way round.
    earlier = [word("the", 84.50, 84.68), word("dining", 84.83, 85.22), word("room", 85.30, 85.60)]
    later = [word("the", 84.49, 84.66), word("dining", 84.81, 85.17), word("room", 85.26, 85.58),
             word("at", 85.70, 85.90)]
    kept = [word("vacuum", 83.80, 84.30)]  # from the windows before
    kept += merge_words(kept, earlier, 85.0)
    kept += merge_words(kept, later, float("inf"))
    assert [(w.word, w.start) for w in kept] == [("vacuum", 83.80), ("the", 84.50), ("dining", 84.81),
                                                 ("room", 85.26), ("at", 85.70)]
    # 3 s windows overlapping by 1 s, border at 2.5: the first window stretched "tenth" to its
    # edge (midpoint 2.625), the second aligned it at 2.19–2.73 (2.46); the second's cut "ober"
    # (the end of "october", which the first kept) is not kept again.
    earlier = [word("on", 1.20, 1.35), word("october", 1.60, 2.10), word("tenth", 2.25, 3.00)]
    later = [word("ober", 2.00, 2.08), word("tenth", 2.19, 2.73)]
    kept = merge_words([], earlier, 2.5)  # the file's first window
    kept += merge_words(kept, later, float("inf"))
    assert [w.word for w in kept] == ["on", "october", "tenth"]
    assert merge_words([], [], 2.5) == [] and merge_words(kept, [], float("inf")) == []


@pytest.mark.parametrize(("chunk", "overlap", "batch_size"), [(5.0, 1.5, 3), (3.0, 1.0, 8), (4.0, 1.9, 1)])
def test_every_word_of_a_long_file_comes_out_once_whatever_its_windows_say(tiny_pipeline, tmp_path, chunk, overlap,
                                                                            batch_size):
    # Real windows of a real file; each window "aligns" a hand-written word list as the demo model
    # did: a word at every border, aligned 30 ms later by one window and 30 ms earlier by the
    # next, every window alternately late and early, and the words cut by its edges, stretched to them.
    audio = np.concatenate([soundfile.read(tiny_pipeline / p, dtype="float32")[0]
                            for p in test_utterances(tiny_pipeline)["audio_path"]] * 3)
    soundfile.write(tmp_path / "long.wav", audio, 16000)
    duration = len(audio) / 16000
    hop = chunk - overlap
    borders = np.arange(chunk - overlap / 2, duration - overlap, hop)
    truth = [(f"b{i}", b - 0.2, b + 0.2) for i, b in enumerate(borders)]  # midpoints on the borders
    truth += [(f"w{i}", b + 0.3, b + 0.6) for i, b in enumerate(borders)] + [("first", 0.1, 0.4)]
    truth.sort(key=lambda t: t[1])
    model = transcriber(tiny_pipeline, chunk_seconds=chunk, overlap_seconds=overlap, batch_size=batch_size)

    def decode(batch):
        found = []
        for w in batch:
            shift = 0.03 if round(w.start / hop) % 2 == 0 else -0.03
            end = w.start + w.seconds
            found.append([word(text, max(a + shift, w.start), end if b + shift > end else b + shift)
                          for text, a, b in truth if a + shift < end and b + shift > w.start])
        return found

    model._decode = decode
    [transcript] = model.transcribe([tmp_path / "long.wav"])
    assert transcript.words and [w.word for w in transcript.words] == [t[0] for t in truth]
    assert transcript.text == " ".join(t[0] for t in truth)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`ctcflow transcribe ARGS` in this process."""
    return run_ctcflow(capsys, "transcribe", *args)


def test_command_prints_text_or_json_lines(tiny_pipeline, capsys, monkeypatch):
    monkeypatch.chdir(tiny_pipeline)  # the defaults: params.yaml, data/features, data/lm
    paths = list(test_utterances(tiny_pipeline)["audio_path"][:2])
    code, out, err = cli(capsys, "models/best.pt", *paths, "--json", "--decoder", "beam",
                         "--blank-penalty", str(PENALTY))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["path"] for line in lines] == paths
    for line in lines:
        assert set(line) == {"path", "text", "duration", "words"}
        assert line["text"] == " ".join(w["word"] for w in line["words"])
        assert all(set(w) == {"word", "start", "end", "confidence"} for w in line["words"])
        assert all(0 <= w["confidence"] <= 1 for w in line["words"])
    code, out, err = cli(capsys, "models/best.pt", paths[0], "--decoder", "greedy")
    assert code == 0 and len(out.splitlines()) == 1, err


def test_command_errors_are_one_line(tiny_pipeline, capsys, monkeypatch):
    monkeypatch.chdir(tiny_pipeline)
    code, out, err = cli(capsys, "models/best.pt", "no/such.wav")
    assert code != 0 and err.startswith("ctcflow transcribe: error:") and "no/such.wav" in err
    code, out, err = cli(capsys, "models/best.pt", test_utterances(tiny_pipeline)["audio_path"][0],
                         "--params", "nowhere.yaml")
    assert code != 0 and err.startswith("ctcflow transcribe: error: nowhere.yaml: no such params file"), err


def test_a_file_with_a_nan_or_infinite_sample_is_refused_before_any_file_is_transcribed(tiny_pipeline, tmp_path,
                                                                                          capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: greedy decoding
    model = str(tiny_pipeline / "models/best.pt")
    good = tiny_pipeline / test_utterances(tiny_pipeline)["audio_path"][0]
    samples, rate = soundfile.read(good, dtype="float32")
    soundfile.write(tmp_path / "float.wav", samples, rate, subtype="FLOAT")  # float WAV can hold NaN; this one doesn't
    code, out, err = cli(capsys, model, str(good), str(tmp_path / "float.wav"), "--blank-penalty", str(PENALTY))
    assert code == 0, err
    assert out.splitlines()[0].split("\t")[1] == out.splitlines()[1].split("\t")[1]  # the same samples, the same text
    for name, value in (("nan.wav", np.nan), ("inf.wav", -np.inf)):
        broken = samples.copy()
        broken[len(broken) // 2] = value
        soundfile.write(tmp_path / name, broken, rate, subtype="FLOAT")
        # The good file comes first and is not printed either: every file is checked before any work.
        code, out, err = cli(capsys, model, str(good), str(tmp_path / name), "--json", "--blank-penalty", str(PENALTY))
        assert (code, out) == (1, "")
        assert err == (f"ctcflow transcribe: error: non_finite_samples: {tmp_path / name} contains NaN or infinite "
                       "samples\n")
        with pytest.raises(AudioError, match=f"{name} contains NaN or infinite samples"):
            list(transcriber(tiny_pipeline).transcribe([good, tmp_path / name]))


def test_a_damaged_file_is_one_line_naming_it_before_any_file_is_transcribed(tiny_pipeline, tmp_path, capsys,
                                                                           monkeypatch):
    # The first half of a FLAC file: integer PCM, so it went unchecked, and libsndfile's "flac
    # decoder lost sync" was a traceback naming no file in the middle of the batch.
    monkeypatch.chdir(tmp_path)  # no params.yaml: greedy decoding
    paths = [str(tiny_pipeline / p) for p in test_utterances(tiny_pipeline)["audio_path"][:2]]
    speech = np.concatenate([soundfile.read(p, dtype="float32")[0] for p in paths] * 3)
    soundfile.write(tmp_path / "whole.flac", speech, 16000)
    flac = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(flac[:len(flac) // 2])
    assert soundfile.info(str(tmp_path / "cut.flac")).subtype == "PCM_16"  # the header still reads
    code, out, err = cli(capsys, str(tiny_pipeline / "models/best.pt"), paths[0], str(tmp_path / "cut.flac"), paths[1],
                         "--blank-penalty", str(PENALTY))
    assert (code, out) == (1, "")
    assert err.startswith(f"ctcflow transcribe: error: unreadable_audio: {tmp_path / 'cut.flac'}: ") and \
        err.count("\n") == 1, err
    # A file that breaks between the check and its reading (cut meanwhile) is the same one line.
    with pytest.raises(AudioError, match=f"^unreadable_audio: {tmp_path / 'cut.flac'}: "):
        list(transcriber(tiny_pipeline)._windows([str(tmp_path / "cut.flac")]))


def test_silent_unscaled_or_clipped_audio_is_transcribed_with_a_warning(tiny_pipeline, tmp_path, capsys, monkeypatch):
    # Featurize rejects the first (silent_audio) and flags the others (clipped_audio); transcribe
    # printed "t" for the silence and garbage for the float file holding 16-bit numbers.
    monkeypatch.chdir(tiny_pipeline)  # params.yaml: featurize.silence_db -60, clip_warn_fraction 0.001
    good = test_utterances(tiny_pipeline)["audio_path"][0]
    samples, rate = soundfile.read(good, dtype="float32")
    soundfile.write(tmp_path / "silence.wav", np.zeros(rate, dtype=np.float32), rate, subtype="PCM_16")
    soundfile.write(tmp_path / "unscaled.wav", samples * (15000 / np.abs(samples).max()), rate, subtype="FLOAT")
    soundfile.write(tmp_path / "loud.wav", np.clip(samples * 8, -1, 1), rate, subtype="PCM_16")
    files = [str(tmp_path / "silence.wav"), good, str(tmp_path / "unscaled.wav"), str(tmp_path / "loud.wav")]
    code, out, err = cli(capsys, "models/best.pt", *files, "--decoder", "greedy", "--blank-penalty", str(PENALTY))
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == files, err
    lines = err.splitlines()
    assert len(lines) == 3
    assert lines[0] == (f"ctcflow transcribe: warning: {files[0]}: silent (peak digital silence <= silence_db -60.0; "
                        "featurize rejects such a file as silent_audio): its transcript is noise")
    share = r"(\d+\.\d\d)% of samples at full scale \(clipped_audio\): transcribed, but expect errors"
    unscaled = re.fullmatch(rf"ctcflow transcribe: warning: {re.escape(files[2])}: peak sample 1\.5e\+04 is above "
                            rf"1\.0 \(float samples not scaled to -1…1\?\); {share}", lines[1])
    loud = re.fullmatch(rf"ctcflow transcribe: warning: {re.escape(files[3])}: {share}", lines[2])
    assert unscaled and loud, err
    for match, path in ((unscaled, files[2]), (loud, files[3])):  # the share featurize counts
        assert float(match[1]) == pytest.approx(100 * decode_audio(path, 16000).clipped_fraction, abs=0.01)
    # The Python API hands the same lines to `warn`.
    found = []
    transcripts = list(transcriber(tiny_pipeline).transcribe(files[:2], warn=found.append))
    assert len(transcripts) == 2 and found == [lines[0].removeprefix("ctcflow transcribe: warning: ")]


def test_the_warning_thresholds_default_to_featurize_s_in_params_yaml():
    import inspect
    import yaml

    featurize = yaml.safe_load((REPO / "params.yaml").read_text())["featurize"]
    defaults = inspect.signature(Transcriber).parameters
    assert defaults["silence_db"].default == featurize["silence_db"]
    assert defaults["clip_warn_fraction"].default == featurize["clip_warn_fraction"]


@pytest.mark.parametrize(("content", "reason"), [
    ("", "End of file Byte: 0"),
    ("hello world\nnot an arpa\n", 'first non-empty line was "hello world" not \\data\\. Byte: 12'),
])
def test_a_damaged_language_model_is_one_line_naming_it(tiny_pipeline, tmp_path, capsys, monkeypatch, content, reason):
    # KenLM's RuntimeError was a traceback.
    monkeypatch.chdir(tiny_pipeline)  # params.yaml: beam search with lexicon and LM
    shutil.copy("data/lm/lexicon.txt", tmp_path / "lexicon.txt")
    (tmp_path / "lm.arpa").write_text(content)
    code, out, err = cli(capsys, "models/best.pt", test_utterances(tiny_pipeline)["audio_path"][0],
                         "--decoder", "beam", "--lm-dir", str(tmp_path))
    assert (code, out) == (1, "")
    assert err == (f"ctcflow transcribe: error: {tmp_path / 'lm.arpa'}: not an ARPA language model KenLM can read "
                   f"({reason}); rebuild it with the lm stage\n")


def test_help_says_what_the_command_prints_and_which_decoder_it_uses(capsys):
    code, out, err = cli(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
    for said in ("the text alone for one file, PATH<TAB>TEXT for several",
                 "With --json, one JSON object per line and file: path, text, duration, and words, each with word, "
                 "start and end (seconds) and confidence (0-1)",
                 "or params.yaml in the current directory if there is one",
                 "Without a params file: greedy decoding"):
        assert said in text
    assert "Transcriber" not in text and "window that owns" not in text  # the module docstring was the help


@pytest.mark.parametrize(("options", "message"), [
    (["--device", "tpu"], "argument --device: device 'tpu': choose cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], f"argument --device: device 'cuda:99': PyTorch sees {torch.cuda.device_count()} CUDA "
                              "GPU(s) here; use cpu"),
    (["--threads", "-3"], "argument --threads: must be at least 1, got -3"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--blank-penalty", "nan"], "argument --blank-penalty: must be a finite number, got nan"),
    (["--blank-penalty=-inf"], "argument --blank-penalty: must be a finite number, got -inf"),
    (["--chunk-seconds", "inf"], "argument --chunk-seconds: must be a finite number, got inf"),
])
def test_a_bad_option_is_argparse_s_error_naming_it(capsys, options, message):
    # Checked before the model or the audio is read: neither needs to exist.
    code, out, err = cli(capsys, "no/model.pt", "no/audio.wav", *options)
    assert (code, out) == (2, "")
    assert f"\nctcflow transcribe: error: {message}\n" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_without_a_gpu_is_refused_up_front(capsys):
    code, out, err = cli(capsys, "no/model.pt", "no/audio.wav", "--device", "cuda")
    assert (code, out) == (2, "")
    assert ("\nctcflow transcribe: error: argument --device: device 'cuda': PyTorch sees 0 CUDA GPU(s) here; "
            "use cpu\n") in err
    with pytest.raises(ValueError, match="device 'cuda': PyTorch sees 0 CUDA GPU"):
        Transcriber("no/model.pt", "greedy", None, None, 0.0, "cuda", 30.0, 4.0, 8, None)


def test_without_a_params_file_decoding_is_greedy_and_beam_search_says_what_it_needs(tiny_pipeline, capsys,
                                                                                      monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no params.yaml, no data/: the checkpoint carries the feature mean/std
    model = str(tiny_pipeline / "models/best.pt")
    audio = str(tiny_pipeline / test_utterances(tiny_pipeline)["audio_path"][0])
    code, out, err = cli(capsys, model, audio, "--blank-penalty", str(PENALTY))
    assert code == 0, err
    [transcript] = transcriber(tiny_pipeline).transcribe([audio])  # greedy, with that penalty
    assert out == transcript.text + "\n"
    code, out, err = cli(capsys, model, audio, "--decoder", "beam")
    assert code != 0 and out == ""
    assert err == ("ctcflow transcribe: error: --decoder beam reads its settings from the evaluate section of a "
                   "params file, and there is no params.yaml here: pass --params\n")


PEAK_RSS = """
import resource, sys
from ctcflow.transcribe import Transcriber
model = Transcriber(sys.argv[1], decoder="greedy", beam=None, lm_dir=None, blank_penalty={penalty}, device="cpu",
                    chunk_seconds=20.0, overlap_seconds=2.0, batch_size=2, num_threads=None)
[transcript] = model.transcribe([sys.argv[2]])
print(transcript.duration, len(transcript.words), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(root: Path, audio: Path) -> tuple[float, int, int]:
    done = subprocess.run([sys.executable, "-c", PEAK_RSS.format(penalty=PENALTY), str(root / "models/best.pt"),
                           str(audio)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    duration, words, rss = done.stdout.split()
    return float(duration), int(words), int(rss)


def test_ten_minutes_transcribe_in_the_memory_of_one(tiny_pipeline, tmp_path):
    speech = np.concatenate([soundfile.read(tiny_pipeline / p, dtype="float32")[0]
                             for p in test_utterances(tiny_pipeline)["audio_path"]])
    for minutes in (1, 10):
        samples = minutes * 60 * 16000
        soundfile.write(tmp_path / f"{minutes}.wav", np.resize(speech, samples), 16000, subtype="PCM_16")
    one = peak_rss_kib(tiny_pipeline, tmp_path / "1.wav")
    ten = peak_rss_kib(tiny_pipeline, tmp_path / "10.wav")
    assert ten[0] == pytest.approx(600, abs=0.01) and ten[1] > one[1] > 0
    # 20 s windows, two per batch: one minute already fills whole batches, so only what grows
    # with the input shows (the words). Holding the 10-minute waveform alone would take
    # 37.5 MiB more (float32), its log-mel frames 18 MiB more; windowed reading stays well under.
    growth_mib = (ten[2] - one[2]) / 1024
    assert growth_mib < 12, f"peak RSS grew by {growth_mib:.1f} MiB from 1 to 10 minutes"


@pytest.fixture(scope="module")
def utterance_normalized(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny project's featurize, train and evaluate again with featurize.normalize:
    utterance_mean_var, evaluate decoding greedily with the blank penalty."""
    from conftest import section
    from stages import evaluate, featurize, train

    root = tmp_path_factory.mktemp("utterance_mean_var")
    with contextlib.chdir(tiny_pipeline):  # the manifests name the audio relative to the project root
        featurize.run(section("featurize", featurize.FeaturizeParams, normalize="utterance_mean_var"),
                      out_dir=root / "data/features", metrics_file=root / "metrics/featurize.json")
    train.run(section("train", train.TrainParams), features_dir=root / "data/features", model_dir=root / "models",
              live_dir=root / "metrics/train")
    evaluate.run(section("evaluate", evaluate.EvaluateParams, decoder="greedy", blank_penalty=PENALTY),
                 features_dir=root / "data/features", model_dir=root / "models", report_dir=root / "reports/eval",
                 metrics_file=root / "metrics/eval.json", lm_dir=tiny_pipeline / "data/lm")
    return root


def test_a_checkpoint_trained_per_utterance_normalized_transcribes_as_evaluate_decodes(tiny_pipeline,
                                                                                         utterance_normalized):
    assert torch.load(utterance_normalized / "models/best.pt", weights_only=True)["normalize"] == "utterance_mean_var"
    model = transcriber(utterance_normalized)
    utterances = test_utterances(tiny_pipeline)
    stored = FeatureSplit(utterance_normalized / "data/features", "test", model.tokenizer)
    utt = utterances.iloc[0]
    ours = model.features(decode_audio(tiny_pipeline / utt.audio_path, model.config.sample_rate).waveform)
    row = stored.index.index[stored.index["id"] == utt.id][0]
    assert torch.allclose(ours, stored[row][0], atol=0.02)
    assert torch.allclose(ours.mean(0), torch.zeros(ours.shape[1]), atol=1e-5)  # per-utterance: each bin centred
    assert torch.allclose(ours.std(0, correction=0), torch.ones(ours.shape[1]), atol=1e-4)  # and scaled
    evaluated = pd.read_csv(utterance_normalized / "reports/eval/utterances.csv", dtype=str, keep_default_na=False)
    transcripts = model.transcribe([tiny_pipeline / p for p in utterances["audio_path"]])
    hypotheses = dict(zip(utterances["id"], (t.text for t in transcripts)))
    assert any(hypotheses.values()), "the blank penalty should make the tiny model emit something"
    # transcribe builds its text from the aligned words; evaluate keeps the greedy string, which
    # can start with a space the model emitted: the words must be the same.
    assert [hypotheses[i] for i in evaluated["id"]] == [" ".join(h.split()) for h in evaluated["hypothesis_greedy"]]
