import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_ctcflow, tiny_params
from stages.cli import main


def ctcflow(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The command in a process of its own, with this repository's code."""
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_help_lists_every_stage():
    done = ctcflow("--help")
    assert done.returncode == 0
    for name in ["synth", "manifest", "featurize", "train", "lm", "evaluate", "plots", "repro", "transcribe",
                 "export", "summary"]:
        assert f"    {name}" in done.stdout


def test_stage_help_describes_the_stage_and_its_params():
    done = ctcflow("train", "--help")
    assert done.returncode == 0
    assert "blank penalty" in done.stdout and "--params" in done.stdout


def test_the_export_stage_s_help_names_the_command_that_runs_it(capsys):
    # It said "usage: ctcflow export [--params PARAMS]", which is the other export command's name.
    from stages import export

    with pytest.raises(SystemExit):
        export.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m stages.export [-h] [--params PARAMS]\n")


def test_a_bad_param_is_one_clear_line_not_a_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  blank_penalty: {mode: argmax}\n")
    done = ctcflow("train", cwd=tmp_path)
    assert done.returncode != 0
    assert "train.blank_penalty.mode" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_input_names_the_stage_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": tiny_params()["evaluate"]}))
    done = ctcflow("evaluate", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "models/best.pt not found" in done.stderr


def test_transcribe_with_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    done = ctcflow("transcribe", "params.yaml", "x.wav", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr == ("ctcflow transcribe: error: params.yaml: not a checkpoint that loads with weights_only=True "
                           "(IndexError: pop from empty list)\n")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("examples_seed", -1, "Input should be greater than or equal to 0 (got -1)"),
    ("blank_penalty", float("nan"), "Input should be a finite number (got nan)"),
    ("blank_penalty", float("inf"), "Input should be a finite number (got inf)"),
])
def test_a_bad_evaluate_value_fails_before_any_decoding(tiny_pipeline, tmp_path, capsys, monkeypatch, key, value,
                                                        message):
    params = tiny_params()
    params["evaluate"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("models", "data"):  # the tiny project's inputs; its outputs would land here
        (tmp_path / name).symlink_to(tiny_pipeline / name)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_ctcflow(capsys, "evaluate")
    assert (code, out) == (1, "")
    assert err == (f"ctcflow evaluate: error: params.yaml: bad or missing value in section 'evaluate':\n"
                   f"  evaluate.{key}: {message}\n")
    assert not (tmp_path / "reports").exists() and not (tmp_path / "metrics").exists()


def test_unknown_command():
    done = ctcflow("tran")
    assert done.returncode != 0 and "unknown command 'tran'" in done.stderr


def test_a_missing_params_key_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("plots: {}\n")
    done = ctcflow("plots", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr == "ctcflow plots: error: params.yaml: bad or missing value in section 'plots':\n" \
                          "  plots.dpi: Field required\n"


@pytest.mark.parametrize(("content", "message"), [
    # PyYAML kept the last dpi, so a stage run alone plotted at 50 where `dvc repro` refused the file.
    (b"plots:\n  dpi: 100\n  dpi: 50\n",
     "params.yaml: not valid YAML: duplicate key 'dpi' (the second would silently win)\n"
     '  in "params.yaml", line 3, column 3:\n      dpi: 50\n      ^'),
    (b"plots:\n  dpi: 100\n\xff\xfe\x00", "params.yaml: not a params file: byte 18 is not UTF-8 text"),
    (b"- plots\n", "params.yaml: not a params file: a mapping of sections is expected, got list"),
    (None, "params.yaml: is a directory, not a params file"),
])
def test_a_params_file_that_cannot_be_read_is_one_line(tmp_path, capsys, monkeypatch, content, message):
    if content is None:
        (tmp_path / "params.yaml").mkdir()
    else:
        (tmp_path / "params.yaml").write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert run_ctcflow(capsys, "plots") == (1, "", f"ctcflow plots: error: {message}\n")


EVAL = {"wer": 0.0068, "cer": 0.0053, "sentence_accuracy": 0.955, "ctc_loss": 0.078, "blank_ratio": 0.093,
        "utterances": 400, "checkpoint_epoch": 10,
        "greedy": {"wer": 0.07402, "cer": 0.017956, "sentence_accuracy": 0.6725, "blank_ratio": 0.095},
        "beam": {"wer": 0.006827, "cer": 0.005294, "sentence_accuracy": 0.955}}


def summary(capsys, *args: str) -> str:
    main(["summary", *args])
    return capsys.readouterr().out


def test_summary_prints_both_decoders_the_time_and_the_plots(tmp_path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    assert summary(capsys, "--metrics", str(tmp_path / "eval.json"), "--elapsed", "723.4") == (
        "test WER  7.40%  CER  1.80%  greedy decoding\n"
        "test WER  0.68%  CER  0.53%  beam search\n"
        "pipeline time: 12 min 03 s\n"
        "plots: plots/*.png, or all of them in one HTML page: dvc plots show\n"
    )


def test_summary_prints_each_extra_test_set_after_the_test_split(tmp_path, capsys):
    with_sets = {**EVAL, "test_sets": {"festival": {"wer": 0.61, "greedy": {"wer": 0.907, "cer": 0.52},
                                                    "beam": {"wer": 0.61, "cer": 0.4449}}}}
    (tmp_path / "eval.json").write_text(json.dumps(with_sets))
    assert summary(capsys, "--metrics", str(tmp_path / "eval.json")) == (
        "test WER  7.40%  CER  1.80%  greedy decoding\n"
        "test WER  0.68%  CER  0.53%  beam search\n"
        "test set festival: WER 90.70%  CER 52.00%  greedy decoding\n"
        "test set festival: WER 61.00%  CER 44.49%  beam search\n"
        "plots: plots/*.png, or all of them in one HTML page: dvc plots show\n"
    )


def test_summary_names_the_split_evaluate_scored(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    (tmp_path / "params.yaml").write_text("evaluate:\n  split: valid\n")
    assert summary(capsys, "--metrics", "eval.json").startswith(  # it said "test" whatever was scored
        "valid WER  7.40%  CER  1.80%  greedy decoding\nvalid WER  0.68%  CER  0.53%  beam search\n")


@pytest.mark.parametrize("evaluate", ["evaluate:\n  split: null\n", "evaluate:\n", "evaluate: null\n"])
def test_summary_without_a_split_in_the_params_says_test(tmp_path, capsys, monkeypatch, evaluate):
    # A null split printed "None WER  7.40%".
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    (tmp_path / "params.yaml").write_text(evaluate)
    assert summary(capsys, "--metrics", "eval.json").startswith("test WER  7.40%  CER  1.80%  greedy decoding\n")


def test_summary_of_a_directory_says_it_is_one(tmp_path):
    # It said "metrics not found" of a folder that is there.
    (tmp_path / "metrics").mkdir()
    done = ctcflow("summary", "--metrics", "metrics", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("ctcflow summary: error: metrics is a directory; --metrics takes the evaluate stage's "
                           "metrics file (metrics/eval.json)\n")


def test_summary_without_a_beam_block_or_a_time(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    # Word units: greedy decoding only.
    words_only = {"wer": 1.0, "cer": 0.5, "greedy": {"wer": 1.0, "cer": 0.5}}
    (tmp_path / "metrics/eval.json").write_text(json.dumps(words_only))
    assert summary(capsys, "--elapsed", "45") == (
        "test WER 100.00%  CER 50.00%  greedy decoding\n"
        "pipeline time: 45 s\n"
        "plots: plots/*.png, or all of them in one HTML page: dvc plots show\n"
    )
    assert summary(capsys) == ("test WER 100.00%  CER 50.00%  greedy decoding\n"
                               "plots: plots/*.png, or all of them in one HTML page: dvc plots show\n")


@pytest.mark.parametrize(("content", "reason"), [
    ("not json", "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
    ('{"greedy": {"wer": "high"}}', "ValueError: Unknown format code '%' for object of type 'str'"),
    ('{"greedy": {"cer": 0.1}}', "KeyError: 'wer'"),
    # The LM stage's metrics printed the plots line alone, rc 0.
    ('{"order": 2, "vocabulary": 10}', "ValueError: no 'greedy' or 'beam' block"),
])
def test_summary_of_a_file_that_is_no_eval_metrics_is_one_line(tmp_path, content, reason):
    (tmp_path / "eval.json").write_text(content)
    done = ctcflow("summary", "--metrics", "eval.json", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"ctcflow summary: error: eval.json is not the evaluate stage's metrics ({reason})\n"


@pytest.mark.parametrize(("elapsed", "message"), [("nan", "must be a finite number, got nan"),
                                                ("-30", "must be 0 or more, got -30")])
def test_summary_refuses_a_time_it_cannot_print(tmp_path, capsys, elapsed, message):
    # nan was a ValueError traceback; -30 printed "pipeline time: -1 min 30 s".
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    code, out, err = run_ctcflow(capsys, "summary", "--metrics", str(tmp_path / "eval.json"), "--elapsed", elapsed)
    assert (code, out) == (2, "")
    assert f"\nctcflow summary: error: argument --elapsed: {message}\n" in err, err


def test_repro_runs_this_environment_s_dvc_without_an_activated_venv(tmp_path):
    # With no dvc on PATH it was a FileNotFoundError traceback; another dvc on PATH would have run
    # the stage commands with another python.
    done = subprocess.run([sys.executable, "-m", "stages.cli", "repro", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: dvc repro ")


def test_summary_before_the_pipeline_ran(tmp_path):
    done = ctcflow("summary", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr == "ctcflow summary: error: metrics/eval.json not found (run the pipeline first: dvc repro)\n"
