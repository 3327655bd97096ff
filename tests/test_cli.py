import subprocess
import sys

from stages.cli import STAGES


def ctcflow(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_stage():
    done = ctcflow("--help")
    assert done.returncode == 0
    for name in [*STAGES, "repro"]:
        assert f"    {name}" in done.stdout


def test_stage_help_describes_the_stage_and_its_params():
    done = ctcflow("train", "--help")
    assert done.returncode == 0
    assert "blank penalty" in done.stdout and "--params" in done.stdout


def test_a_bad_param_is_one_clear_line_not_a_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  blank_penalty: {mode: argmax}\n")
    done = ctcflow("train", cwd=tmp_path)
    assert done.returncode != 0
    assert "train.blank_penalty.mode" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_input_names_the_stage_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text("evaluate: {}\n")
    done = ctcflow("evaluate", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "models/best.pt not found" in done.stderr


def test_unknown_command():
    done = ctcflow("tran")
    assert done.returncode != 0 and "unknown command 'tran'" in done.stderr
