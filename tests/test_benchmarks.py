"""The benchmarks run on the tiny project, and the pairs they time do the same work.

Their speed figures are not asserted here: those belong to `make bench`, on an idle machine.
What is asserted is what makes a ratio mean something: 2 featurize workers write the bytes 1
writes, and the bare training loop ends with the stage's weights, bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchaudio.functional as AF
import yaml
from conftest import FSDD, REPO, run_python


def run_benchmark(name: str, *args: str, out: Path) -> dict:
    run_python([str(REPO / "benchmarks" / f"{name}.py"), *args, "--out", str(out)], REPO)
    return json.loads(out.read_text())


def test_featurize_benchmark_compares_the_same_files_and_workers_agree(tiny_pipeline, tmp_path):
    results = run_benchmark("featurize", "--project-dir", str(tiny_pipeline), "--rounds", "1", "--workers", "2",
                            out=tmp_path / "featurize.json")
    manifests = [pd.read_json(tiny_pipeline / f"data/manifests/{s}.jsonl", lines=True) for s in ("train", "valid", "test")]
    assert results["files"] == sum(len(m) for m in manifests)
    assert results["parallel_output_identical"] is True
    assert set(results["audio_seconds_per_second"]) == {"bare loop (soundfile.read + log-mel), 1 process",
                                                        "featurize stage, 1 worker", "featurize stage, 2 workers"}
    assert all(rate > 0 for rate in results["audio_seconds_per_second"].values())


def test_train_benchmark_bare_loop_ends_with_the_stages_weights(tiny_pipeline, tmp_path):
    results = run_benchmark("train", "--project-dir", str(tiny_pipeline), "--rounds", "1", "--utterances", "24",
                            "--valid-utterances", "4", "--num-threads", "1", out=tmp_path / "train.json")
    assert results["weights_identical_after_the_epoch"] is True
    assert results["frames"] > 0 and results["batches"] >= 1
    assert set(results["ratio_stage_to_bare"]) == {"fp32, 0 loader workers", "fp32, 2 loader workers",
                                                   "bf16, 0 loader workers", "bf16, 2 loader workers"}
    assert set(results["ratio_bare_to_fp32_bare"]) == {"fp32", "bf16"} and results["ratio_bare_to_fp32_bare"]["fp32"] == 1
    assert all(share > 0 for share in results["data_loader_share_of_step_time"].values())  # workers: their start too


def test_dask_featurize_benchmark_compares_the_same_files_on_every_executor(tiny_pipeline, tmp_path):
    results = run_benchmark("dask_featurize", "--project-dir", str(tiny_pipeline), "--rounds", "1",
                            out=tmp_path / "dask_featurize.json")
    assert results["output_identical"] is True
    assert set(results["audio_seconds_per_second"]) == {"local, 1 worker(s)", "local, 2 worker(s)",
                                                        "dask, 1 worker(s)", "dask, 2 worker(s)"}
    assert results["ratio_to_local_1_worker"]["local, 1 worker(s)"] == 1.0
    assert set(results["cluster_start_seconds"]) == {"1 worker(s)", "2 worker(s)"}


def fsdd_transforms():
    sys.path.insert(0, str(REPO))
    from benchmarks import fsdd_transforms as module
    return module


def test_lpc_recovers_a_known_all_pole_filter():
    # x[n] = e[n] + 1.3 x[n-1] - 0.6 x[n-2]: poles at radius 0.77, so A(z) = 1 - 1.3 z^-1 + 0.6 z^-2.
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = AF.lfilter(noise, torch.tensor([1.0, -1.3, 0.6], dtype=torch.float64),
                   torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), clamp=False)
    a, error = fsdd_transforms().lpc(x.numpy(), 2)
    assert np.allclose(a, [1.0, -1.3, 0.6], atol=0.03)
    assert error / float(x @ x) == pytest.approx(float(noise @ noise) / float(x @ x), rel=0.05)  # the residual is e


def test_the_vocoder_keeps_the_envelope_and_replaces_the_source():
    # A vowel-like sound: 120 Hz pulses through one resonance at 700 Hz.
    module = fsdd_transforms()
    pulses = torch.zeros(16000, dtype=torch.float64)
    pulses[:: 16000 // 120] = 1.0
    radius, theta = 0.97, 2 * np.pi * 700 / 16000
    vowel = AF.lfilter(pulses, torch.tensor([1.0, -2 * radius * np.cos(theta), radius**2], dtype=torch.float64),
                       torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), clamp=False).float()
    def power(x: torch.Tensor) -> torch.Tensor:
        return torch.stft(x, 1024, 256, window=torch.hann_window(1024), return_complex=True).abs().square().mean(1)

    def ripple(p: torch.Tensor) -> float:
        return float((p[10:60].log() - p[10:60].log().mean()).abs().mean())

    outputs = {source: module.vocode(vowel, source, torch.Generator().manual_seed(0)) for source in ("noise", "pulses")}
    for source, out in outputs.items():
        assert out.shape == vowel.shape and torch.isfinite(out).all()
        smoothed = torch.nn.functional.avg_pool1d(power(out)[None, None], 9, 1, 4)[0, 0]  # over harmonics
        assert abs(float(smoothed[:200].argmax()) * 16000 / 1024 - 700) < 80, source
    # The noise source has no harmonics left: its spectrum is as smooth as its envelope.
    assert ripple(power(outputs["noise"])) < ripple(power(vowel)) / 2


def test_fsdd_transforms_benchmark_scores_every_transform(tiny_pipeline, tmp_path):
    if not FSDD.is_dir():
        pytest.skip(f"no FSDD recordings at {FSDD} (set CTCFLOW_FSDD_RECORDINGS)")
    results = run_benchmark("fsdd_transforms", "--fsdd", str(FSDD), "--step", "200", "--threads", "1",
                            "--model", str(tiny_pipeline / "models/best.pt"), "--lm-dir", str(tiny_pipeline / "data/lm"),
                            "--params", str(tiny_pipeline / "params.yaml"), "--penalties", "0,2",
                            out=tmp_path / "fsdd_transforms.json")
    assert results["fsdd_recordings"] == 10  # 2,000 recordings, every 200th
    assert len(results["transforms"]) == 11 and "as is" in results["transforms"]
    for scores in results["transforms"].values():
        assert set(scores) == {"fsdd/greedy", "fsdd/beam"}
        assert all(s["wer"] >= 0 and 0 <= s["empty"] <= 100 for s in scores.values())
    assert set(results["blank_penalty"]) == {"0.0", "2.0"}


def test_make_bench_sees_the_demo_pipeline_up_to_date_beside_a_recipe_never_run(tmp_path):
    # `dvc status` without a target also checked recipes/fsdd/dvc.yaml, never up to date without
    # FSDD's recordings, so make bench skipped its orchestration benchmark on every run.
    import os
    import subprocess

    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_all

    def dvc(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, check=True, capture_output=True)

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q")
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    (tmp_path / "recipes/r").mkdir(parents=True)
    (tmp_path / "recipes/r/dvc.yaml").write_text(
        "stages:\n  read:\n    cmd: cat data/missing.txt > copy.txt\n    deps: [data/missing.txt]\n    outs: [copy.txt]\n")
    env = dict(os.environ)
    assert run_all.pipeline_state(tmp_path, env).startswith("the pipeline is not up to date (changed: hello)")
    dvc("repro")  # the root dvc.yaml, as make demo runs it
    assert run_all.pipeline_state(tmp_path, env) is None


def test_long_audio_benchmark_scores_each_variant_over_the_same_words(tiny_pipeline, tmp_path):
    results = run_benchmark("long_audio", "--project-dir", str(tiny_pipeline), "--utterances", "4",
                            "--chunk-seconds", "3", "6", out=tmp_path / "long_audio.json")
    assert results["utterances"] == 4 and results["model"] == "models/best.pt"
    assert list(results["wer_percent"]) == ["as they are", "padded with silence", "padded with faint noise",
                                            "one long file, 3 s windows", "one long file, 6 s windows"]
    for scores in results["wer_percent"].values():
        assert set(scores) == {"greedy", "beam"} and all(wer >= 0 for wer in scores.values())


def test_lm_sweep_decodes_every_pair_and_matches_evaluate_at_the_params_pair(tiny_pipeline, tmp_path):
    evaluated = json.loads((tiny_pipeline / "metrics/eval.json").read_text())
    beam = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())["evaluate"]["beam"]
    lm_weight, word_score = beam["lm_weight"], beam["word_score"]
    results = run_benchmark("lm_sweep", "--project-dir", str(tiny_pipeline), "--splits", "test", "valid",
                            "--lm-weights", "0.5", str(lm_weight), "--word-scores", "-2", str(word_score),
                            "--threads", "1", out=tmp_path / "lm_sweep.json")
    assert results["chosen_on"] == "test" and list(results["results"]) == ["test", "valid"]
    test = results["results"]["test"]
    assert set(test) == {"greedy", "lm_weight=0.5 word_score=-2", f"lm_weight=0.5 word_score={word_score:g}",
                         f"lm_weight={lm_weight:g} word_score=-2", f"lm_weight={lm_weight:g} word_score={word_score:g}"}
    # The params.yaml pair and greedy decoding are what evaluate scored on its split (test).
    assert test[f"lm_weight={lm_weight:g} word_score={word_score:g}"]["wer_percent"] == round(100 * evaluated["beam"]["wer"], 2)
    assert test["greedy"]["wer_percent"] == round(100 * evaluated["greedy"]["wer"], 2)
    assert test[results["best"]]["wer_percent"] == min(v["wer_percent"] for k, v in test.items() if k != "greedy")
    assert all(0 <= v["empty_percent"] <= 100 for split in results["results"].values() for v in split.values())


def test_lm_sweep_names_a_split_the_feature_store_lacks(tiny_pipeline, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lm_sweep.py"), "--project-dir", str(tiny_pipeline),
                           "--splits", "valid", "nosuch", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0 and "--splits nosuch:" in done.stderr, done.stderr
    assert not (tmp_path / "x.json").exists()
