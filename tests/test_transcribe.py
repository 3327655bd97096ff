"""Transcription of audio files with a model trained in the tests (the tiny pipeline's)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
import torch
import torchaudio.functional as AF

from conftest import run_ctcflow
from ctcflow.audio import AudioError, decode_audio
from ctcflow.data import FeatureSplit
from ctcflow.transcribe import Transcriber

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
